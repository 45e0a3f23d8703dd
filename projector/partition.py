"""Projector partitions: ``N`` projectors, each the only writer of its share of the device and
node keys of the one ``cluster_state`` bucket.

Why: one projector process is the ceiling past ~2,500 nodes at a 1 s interval (the client, not
the server, is the limit), so the way out is more projectors, not a faster one.

How the telemetry is split, without changing a subject anyone publishes or reads: two streams
*mirror* TELEMETRY through nats-server subject transforms that put ``partition(N, node)`` in
front, ``TELEMETRY_P<N>`` the device samples (``telemetry.gpu.<node>.<i>`` is stored as
``tpart.<p>.telemetry.gpu.<node>.<i>``) and ``TELEMETRY_P<N>_NODES`` the heartbeats
(``tpart.<p>.telemetry.node.<node>``); partition ``p`` consumes ``tpart.<p>.>`` of both. The
server hashes the node token (FNV-1a, modulo N), so a node's devices and its heartbeat land in
the same partition, which is all the reducer joins (a node's heartbeat and its devices'
liveness). ``partition_of`` is the same hash, so a partition knows its keys: it loads and
sweeps only those, and never writes another partition's. Assignments and shard statuses (a few
per placement) stay with partition 0, which owns the instance keys. Each partition has its own
lease key, so any number of replicas per partition take over from each other as one projector
does. The planner and API are unchanged: they read the one bucket.

Why two mirrors and not one stream that sources TELEMETRY with both transforms (as before):

- Cost. A source or mirror with two transforms reads TELEMETRY through a consumer with two
  filter subjects, and nats-server finds each next message for such a consumer by intersecting
  the filters with every subject of the message block (``firstMatchingMulti``): ~43 µs of
  server CPU per sample copied here (nats-server 2.15.1, 8,000 devices), more than draining it
  costs. One transform per copy is one filter: ~6.5 µs per sample.
- Time. A mirror stores each message with TELEMETRY's own sequence and timestamp (a source
  stamps its own), so a partition judges liveness by the same clock one projector does, and
  the order between a node's heartbeat and its samples (two streams now) does not matter: the
  reducer compares stream times, and these are TELEMETRY's. A copy made late (a partitions'
  stream created on a running fleet, re-mirrored after a restore) does not make old samples
  look fresh.
- Less to carry. A mirror adds no ``Nats-Stream-Source`` header to every copy, so deliveries
  are smaller for the server and plain for the projector's pull loop.

The mirrors store each sample a second time: the server pays for the split, the projector
clients (the bottleneck) each see only their share.
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client

from shardplane.bus import keys, subjects
from shardplane.bus.errors import ProjectorError
from shardplane.bus.retry import describe, retrying
from shardplane.bus.streams import (
    MAX_PARTITIONS,
    PLACEMENTS,
    SHARDS,
    TELEMETRY,
    partition_node_stream,
    partition_stream,
    replicas_from_env,
    settle_replicas,
)

PREFIX = "tpart"
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def stream_name(count: int) -> str:
    return partition_stream(count)


def fnv1a32(text: str) -> int:
    h = _FNV_OFFSET
    for byte in text.encode():
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


@functools.lru_cache(maxsize=1 << 17)
def partition_of(node: str, count: int) -> int:
    """The partition nats-server's ``partition(count, node)`` transform puts ``node`` in
    (remembered: every write asks it, and the hash is a Python loop over the name)."""
    return fnv1a32(node) % count


def node_of_key(key: str) -> str | None:
    """The node of a device or node key (``devices.<node>.<i>``, ``nodes.<node>``); None for
    anything else (instances, which partition 0 owns)."""
    return keys.node_of(key)


def transforms(count: int) -> list[dict[str, str]]:
    """The two partitioning transforms: device samples, heartbeats."""
    gpu, node = subjects.TELEMETRY_GPU, subjects.TELEMETRY_NODE
    head = f"{PREFIX}.{{{{partition({count},1)}}}}"
    return [
        {"src": f"{gpu}.*.*", "dest": f"{head}.{gpu}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"},
        {"src": f"{node}.*", "dest": f"{head}.{node}.{{{{wildcard(1)}}}}"},
    ]


def stream_names(count: int) -> tuple[str, str]:
    """The partitions' streams: device samples, heartbeats."""
    return stream_name(count), partition_node_stream(count)


def stream_configs(count: int, replicas: int = 1) -> list[dict[str, object]]:
    """The mirrors' configs (JSON, as the JetStream API takes it): one transform each (one
    filter: see the module's docstring), a short replay buffer like TELEMETRY's, ``replicas``
    copies (TELEMETRY's own, by :func:`provision`)."""
    return [
        {
            "name": name,
            "retention": "limits",
            "storage": "file",
            "max_msgs_per_subject": 64,
            "max_age": 3600 * 10**9,
            "max_bytes": 2 * 1024**3,
            "discard": "old",
            "num_replicas": replicas,
            "mirror": {"name": TELEMETRY, "subject_transforms": [transform]},
        }
        for name, transform in zip(stream_names(count), transforms(count), strict=True)
    ]


class PartitionError(ProjectorError, RuntimeError):
    pass


async def _api(nc: Client, verb: str, name: str, body: bytes = b"") -> dict[str, Any]:
    reply = await nc.request(f"$JS.API.STREAM.{verb}.{name}", body)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


async def _telemetry_replicas(nc: Client, wait_s: float) -> int:
    """TELEMETRY's replicas, asked again while it elects a leader (bus.retry: just created on
    a cluster); no mirror is made of a stream of unknown size."""
    js = nc.jetstream()
    try:
        info = await retrying(
            lambda: js.stream_info(TELEMETRY), f"{TELEMETRY} info", deadline_s=wait_s
        )
    except Exception as exc:
        raise PartitionError(f"provision the partitions: {TELEMETRY}: {describe(exc)}") from exc
    return info.config.num_replicas or 1


async def provision(nc: Client, count: int, telemetry_wait_s: float = 10.0) -> None:
    """Create (or update) the partitions' streams for ``count``; idempotent. A stream of the
    earlier layout (one stream *sourcing* TELEMETRY) is replaced: a mirror cannot be made of
    it in place, and it holds only copies, which the mirror takes again from TELEMETRY with
    their own sequences (a partition's consumer is recreated at its ack floor, ``cursor``).

    A new mirror gets as many replicas as TELEMETRY has: on a 3-server cluster one copy would
    stall its partitions when its server is lost, while TELEMETRY lives on. An existing mirror
    keeps the replicas it has (an operator may have set them), raised only where
    ``SHARDPLANE_REPLICAS`` asks for more, as every other stream (bus.streams.settle_replicas)."""
    telemetry_replicas = await _telemetry_replicas(nc, telemetry_wait_s)
    explicit = replicas_from_env()
    replicas = explicit or telemetry_replicas
    for config in stream_configs(count, replicas):
        name = str(config["name"])
        body = json.dumps(config).encode()
        answer = await _api(nc, "CREATE", name, body)
        if "error" in answer and answer["error"].get("err_code") == 10058:  # name in use
            held = (await _api(nc, "INFO", name)).get("config", {"mirror": None})
            if "mirror" not in held:
                await _api(nc, "DELETE", name)
                answer = await _api(nc, "CREATE", name, body)
            else:
                current = int(held.get("num_replicas") or 1)
                kept = {
                    **config,
                    "num_replicas": settle_replicas(name, current, replicas, explicit is not None),
                }
                answer = await _api(nc, "UPDATE", name, json.dumps(kept).encode())
        if "error" in answer:
            raise PartitionError(f"provision stream {name}: {answer['error']}")


async def ensure(nc: Client, count: int, poll_s: float = 0.5) -> None:
    """Provision the partitions' streams, or, connected as a role that may not create streams
    (bus.auth), wait until an admin has: ``shardplane up --partitions N`` provisions them as
    admin before any projector starts."""
    from shardplane.bus.auth import may_provision

    if may_provision(nc):
        await provision(nc, count)
        return
    waiting = list(stream_names(count))
    while waiting:
        waiting = [name for name in waiting if "error" in await _api(nc, "INFO", name)]
        if waiting:
            await asyncio.sleep(poll_s)


@dataclass(frozen=True)
class Partition:
    """Partition ``index`` of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index} of {self.count}: need 0 <= index < count")
        if self.count > MAX_PARTITIONS:
            raise ValueError(f"{self.count} partitions: at most {MAX_PARTITIONS}")

    @property
    def stream(self) -> str:
        """The device samples' stream (the bulk of the telemetry)."""
        return stream_name(self.count)

    @property
    def telemetry_streams(self) -> tuple[str, str]:
        return stream_names(self.count)

    @property
    def lease_key(self) -> str:
        return f"leader-p{self.index}-of-{self.count}"

    def consumers(self) -> dict[str, tuple[str, str | None]]:
        """stream -> (durable, filter subject) this partition consumes."""
        durable = f"projector_p{self.index}_of_{self.count}"
        mine = f"{PREFIX}.{self.index}.>"
        devices, nodes = self.telemetry_streams
        out: dict[str, tuple[str, str | None]] = {
            devices: (durable, mine),
            nodes: (f"{durable}_nodes", mine),
        }
        if self.index == 0:
            out[PLACEMENTS] = ("projector_placements", None)
            out[SHARDS] = ("projector_shards", None)
        return out

    def owns(self, key: str) -> bool:
        node = node_of_key(key)
        if node is None:
            return self.index == 0
        return partition_of(node, self.count) == self.index

    @staticmethod
    def original_subject(subject: str) -> str:
        """``tpart.<p>.telemetry...`` -> ``telemetry...`` (other subjects unchanged)."""
        if subject.startswith(PREFIX + "."):
            return subject.split(".", 2)[2]
        return subject
