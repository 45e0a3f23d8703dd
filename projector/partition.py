"""Projector partitions: ``N`` projectors, each the only writer of its share of the device and
node keys of the one ``cluster_state`` bucket.

Why: one projector process is the ceiling past ~2,500 nodes at a 1 s interval (the client, not
the server, is the limit), so the way out is more projectors, not a faster one.

How the telemetry is split, without changing a subject anyone publishes or reads: a stream
``TELEMETRY_P<N>`` *sources* TELEMETRY through nats-server subject transforms that put
``partition(N, node)`` in front (``telemetry.gpu.<node>.<i>`` is stored as
``tpart.<p>.telemetry.gpu.<node>.<i>``, heartbeats likewise), and partition ``p`` consumes
``tpart.<p>.>``. The server hashes the node token (FNV-1a, modulo N), so a node's devices and its
heartbeat land in the same partition, which is all the reducer joins (a node's heartbeat and its
devices' liveness). ``partition_of`` is the same hash, so a partition knows its keys: it loads and
sweeps only those, and never writes another partition's. Assignments and shard statuses (a few
per placement) stay with partition 0, which owns the instance keys. Each partition has its own
lease key, so any number of replicas per partition take over from each other as one projector
does. The planner and API are unchanged: they read the one bucket.

The sourced stream stores each sample a second time: the server pays for the split, the
projector clients (the bottleneck) each see only their share.
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass

from nats.aio.client import Client

from shardplane.bus import keys, subjects
from shardplane.bus.errors import ProjectorError
from shardplane.bus.streams import (
    MAX_PARTITIONS,
    PLACEMENTS,
    SHARDS,
    TELEMETRY,
    partition_stream,
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
    gpu, node = subjects.TELEMETRY_GPU, subjects.TELEMETRY_NODE
    head = f"{PREFIX}.{{{{partition({count},1)}}}}"
    return [
        {"src": f"{gpu}.*.*", "dest": f"{head}.{gpu}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"},
        {"src": f"{node}.*", "dest": f"{head}.{node}.{{{{wildcard(1)}}}}"},
    ]


def stream_config(count: int) -> dict[str, object]:
    """The sourced stream's config (JSON, as the JetStream API takes it): a short replay
    buffer like TELEMETRY's, the newest samples per device."""
    return {
        "name": stream_name(count),
        "retention": "limits",
        "storage": "file",
        "max_msgs_per_subject": 64,
        "max_age": 3600 * 10**9,
        "max_bytes": 2 * 1024**3,
        "discard": "old",
        "num_replicas": 1,
        "sources": [{"name": TELEMETRY, "subject_transforms": transforms(count)}],
    }


class PartitionError(ProjectorError, RuntimeError):
    pass


async def provision(nc: Client, count: int, api_prefix: str = "$JS.API") -> None:
    """Create (or update) ``TELEMETRY_P<count>``; idempotent."""
    config = stream_config(count)
    name = stream_name(count)
    for verb in ("CREATE", "UPDATE"):
        reply = await nc.request(f"{api_prefix}.STREAM.{verb}.{name}", json.dumps(config).encode())
        answer = json.loads(reply.data)
        if "error" not in answer:
            return
        if verb == "UPDATE" or answer["error"].get("err_code") != 10058:  # 10058: name in use
            raise PartitionError(f"{verb.lower()} stream {name}: {answer['error']}")


async def ensure(nc: Client, count: int, poll_s: float = 0.5) -> None:
    """Provision ``TELEMETRY_P<count>``, or, connected as a role that may not create streams
    (bus.auth), wait until an admin has: ``shardplane up --partitions N`` provisions it as
    admin before any projector starts."""
    from shardplane.bus.auth import may_provision

    if may_provision(nc):
        await provision(nc, count)
        return
    name = stream_name(count)
    while True:
        reply = await nc.request(f"$JS.API.STREAM.INFO.{name}", b"")
        if "error" not in json.loads(reply.data):
            return
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
        return stream_name(self.count)

    @property
    def lease_key(self) -> str:
        return f"leader-p{self.index}-of-{self.count}"

    def consumers(self) -> dict[str, tuple[str, str | None]]:
        """stream -> (durable, filter subject) this partition consumes."""
        out: dict[str, tuple[str, str | None]] = {
            self.stream: (f"projector_p{self.index}_of_{self.count}", f"{PREFIX}.{self.index}.>")
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
