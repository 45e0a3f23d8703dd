"""Idempotent provisioning of the streams and KV buckets the pipeline runs on.

Replication is configuration, not something each service start decides anew: the number of
replicas comes from ``SHARDPLANE_REPLICAS`` (or a caller's explicit value), else 1 on a single
server and 3 on a cluster. Provisioning creates what is missing with that number, raises an
existing stream or bucket to it only when it was asked for explicitly, and never lowers one:
a service that restarts must not undo replicas an operator set by hand (on main it reset every
stream to 1 at each start). A difference is logged so the operator can see it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from typing import Any, cast

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from shardplane.bus import keys
from shardplane.bus.errors import BusError
from shardplane.bus.retry import retrying

log = logging.getLogger(__name__)

REPLICAS_ENV = "SHARDPLANE_REPLICAS"
CLUSTER_REPLICAS = 3  # a cluster's default: survives the loss of any one of three servers
MAX_REPLICAS = 5  # JetStream's own limit

TELEMETRY = "TELEMETRY"
PLACEMENTS = "PLACEMENTS"
SHARDS = "SHARDS"
DEADLETTER = "DEADLETTER"
CLUSTER_STATE = "cluster_state"
LEDGER = "placement_ledger"  # the planners' memory ledger (planner-owned, CAS-guarded)
# The ledger's one document: every instance's promise and its current generation. Workers and
# the projector read it too (bus.authority): an assignment counts only at the ledger's generation.
LEDGER_RESERVATIONS_KEY = keys.LEDGER_RESERVATIONS
# Projector partitions (projector.partition): TELEMETRY mirrored, partitioned, into two
# streams per partition count, TELEMETRY_P<count> (device samples) and TELEMETRY_P<count>_NODES
# (heartbeats); the projector role may consume those of up to MAX_PARTITIONS.
MAX_PARTITIONS = 16


def partition_stream(count: int) -> str:
    return f"{TELEMETRY}_P{count}"


# JetStream keeps a KV bucket in a stream of its own and carries each write on a subject; both
# names are derived from the bucket's, and spelled here only.
def kv_stream(bucket: str) -> str:
    """The stream that holds ``bucket``."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str = "") -> str:
    """The subject a write of ``key`` to ``bucket`` travels on (``key`` may be a wildcard such
    as ``devices.>``); with no key, the prefix every such subject starts with."""
    return f"$KV.{bucket}.{key}"


def partition_node_stream(count: int) -> str:
    return f"{TELEMETRY}_P{count}_NODES"


DAY = 24 * 3600.0
PLACEMENT_CONSUMERS = 100_000
DEDUPE_S = 120.0  # a publish retried within this window (same Nats-Msg-Id) is stored once


def _kept(name: str, subjects: list[str], replicas: int, **limits: Any) -> StreamConfig:
    """A stream as every one of ours is: on file, kept by its limits (never by interest or
    acks, so any number of readers may replay it), ``replicas`` copies."""
    limits.update(retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, num_replicas=replicas)
    return StreamConfig(name=name, subjects=subjects, **limits)


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    """The streams, with limits that keep a long-running fleet's store bounded.

    Telemetry keeps a short history per subject (the KV has the newest; the stream is the
    replay buffer for the projector), placements and statuses keep enough to rebuild state.
    """
    return [
        _kept(
            TELEMETRY,
            ["telemetry.>"],
            replicas,
            max_msgs_per_subject=64,
            max_age=3600.0,
            max_bytes=2 * 1024**3,
            discard=DiscardPolicy.OLD,
            duplicate_window=DEDUPE_S,
        ),
        # Assignments (planner) and health verdicts (controller): both are instance history
        # the projector folds into cluster_state. Left unset, max_consumers makes nats-server
        # refuse the 1,001st consumer (10026); a fleet of real hosts runs one agent, so one
        # assignment consumer, per host.
        _kept(
            PLACEMENTS,
            ["placement.assigned.>", "placement.health.>"],
            replicas,
            max_age=30 * DAY,
            max_msgs_per_subject=10_000,
            max_bytes=512 * 1024**2,
            max_consumers=PLACEMENT_CONSUMERS,
            duplicate_window=DEDUPE_S,
        ),
        _kept(
            SHARDS,
            ["shard.status.>"],
            replicas,
            max_age=7 * DAY,
            max_msgs_per_subject=256,
            max_bytes=512 * 1024**2,
            duplicate_window=DEDUPE_S,
        ),
        _kept(
            DEADLETTER,
            ["deadletter.>"],
            replicas,
            max_age=7 * DAY,
            max_msgs=100_000,
            max_bytes=256 * 1024**2,
        ),
    ]


BUCKETS = {
    CLUSTER_STATE: "materialised cluster state; written by the projector only",
    LEDGER: "memory promised to placed instances; planners update it by CAS",
}


def bucket_configs(replicas: int = 1) -> list[KeyValueConfig]:
    """Both buckets keep one value a key (readers want the newest, never a history) and
    answer direct gets (any replica reads, not only the stream leader)."""
    return [
        KeyValueConfig(
            bucket=bucket,
            description=description,
            history=1,
            storage=StorageType.FILE,
            replicas=replicas,
            direct=True,
        )
        for bucket, description in BUCKETS.items()
    ]


class ReplicasError(BusError, ValueError):
    pass


def replicas_from_env(value: str | None = None) -> int | None:
    """``SHARDPLANE_REPLICAS`` as a number, None when unset; a clear error when it is not
    1..5."""
    raw = os.environ.get(REPLICAS_ENV) if value is None else value
    if raw is None or not raw.strip():
        return None
    try:
        replicas = int(raw)
    except ValueError:
        raise ReplicasError(f"{REPLICAS_ENV}={raw!r} is not a whole number (1 to 5)") from None
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ReplicasError(f"{REPLICAS_ENV}={replicas} is out of range: 1 to {MAX_REPLICAS}")
    return replicas


def clustered(js: JetStreamContext) -> bool:
    """Whether the server this client talks to is part of a cluster (its INFO names one)."""
    nc = cast("Any", js)._nc  # nats-py keeps the connection there; INFO has no public getter
    info = cast("dict[str, Any]", getattr(nc, "_server_info", None) or {})
    return bool(info.get("cluster"))


def wanted_replicas(js: JetStreamContext, replicas: int | None = None) -> tuple[int, bool]:
    """(replicas, explicit): the caller's or ``SHARDPLANE_REPLICAS``'s number (explicit), else
    1 on a single server and 3 on a cluster."""
    chosen = replicas if replicas is not None else replicas_from_env()
    if chosen is not None:
        return chosen, True
    return (CLUSTER_REPLICAS if clustered(js) else 1), False


# The settings provisioning owns on an existing stream (limits); replicas are handled apart.
_OWNED = (
    "subjects",
    "max_msgs",
    "max_bytes",
    "max_age",
    "max_msgs_per_subject",
    "discard",
    "duplicate_window",
)


def settle_replicas(name: str, current: int, wanted: int, explicit: bool) -> int:
    """The replicas an existing stream keeps: raised to an explicitly asked-for number, never
    lowered, otherwise left as it is; a difference is logged."""
    if wanted > current and explicit:
        log.info("%s: raising replicas from %d to %d", name, current, wanted)
        return wanted
    if wanted != current:
        log.warning(
            "%s has %d replicas where %d are configured; keeping %d (provisioning never "
            "lowers replicas, and raises them only when %s or --replicas asks for it)",
            name,
            current,
            wanted,
            current,
            REPLICAS_ENV,
        )
    return current


async def _ensure_stream(js: JetStreamContext, config: StreamConfig, explicit: bool) -> None:
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return
    current = info.config
    replicas = settle_replicas(
        config.name, current.num_replicas or 1, config.num_replicas or 1, explicit
    )
    changed = replicas != (current.num_replicas or 1) or any(
        getattr(config, f) is not None and getattr(config, f) != getattr(current, f) for f in _OWNED
    )
    if changed:
        # Start from the stream's own config so settings we do not own (an operator's
        # placement, mirrors, allow_atomic...) survive the update.
        update = dataclasses.replace(
            current, **{f: getattr(config, f) for f in _OWNED if getattr(config, f) is not None}
        )
        update.num_replicas = replicas
        await js.update_stream(update)


async def ensure_bucket(js: JetStreamContext, bucket: KeyValueConfig, explicit: bool) -> KeyValue:
    """The bucket, created with ``bucket``'s config when missing; an existing one keeps its
    settings except that an explicit higher replica count raises it."""
    try:
        kv = await js.key_value(bucket.bucket)
    except (NotFoundError, BadRequestError):
        return await js.create_key_value(bucket)
    stream = kv_stream(bucket.bucket)
    info = await js.stream_info(stream)
    current = info.config.num_replicas or 1
    replicas = settle_replicas(stream, current, bucket.replicas or 1, explicit)
    if replicas != current:
        await js.update_stream(dataclasses.replace(info.config, num_replicas=replicas))
    return kv


async def provision(js: JetStreamContext, replicas: int | None = None) -> None:
    """Create what is missing; keep what exists (see the module docstring on replicas). Safe
    to run any number of times, from any number of services at once.

    Only in the single-user dev mode (no shardplane role) or as ``admin``: a connection with
    any other role (``bus.auth``) may not create or change streams, so it only waits until an
    admin has provisioned them (``shardplane up`` does so first; else ``shardplane auth
    provision``)."""
    from shardplane.bus.auth import may_provision

    if not may_provision(js._nc):  # pyright: ignore[reportPrivateUsage]
        await wait_provisioned(js)
        return
    count, explicit = wanted_replicas(js, replicas)
    # Services provision as they start, which on a cluster may be while it elects a leader
    # (all of them starting together, a server just lost): ride that out (bus.retry).
    for config in stream_configs(count):
        await retrying(
            lambda c=config: _ensure_stream(js, c, explicit), f"provisioning {config.name}"
        )
    for bucket in bucket_configs(count):
        await retrying(
            lambda b=bucket: ensure_bucket(js, b, explicit), f"provisioning {bucket.bucket}"
        )


PROVISION_WAIT_LOG_S = 10.0


async def wait_provisioned(js: JetStreamContext) -> None:
    """Return once every stream and bucket exists; says what is missing every few seconds."""
    names = [c.name for c in stream_configs() if c.name] + [
        kv_stream(b.bucket) for b in bucket_configs()
    ]
    waited = 0.0
    while True:
        missing: list[str] = []
        for name in names:
            try:
                await js.stream_info(name)
            except NotFoundError:
                missing.append(name)
        if not missing:
            return
        if waited % PROVISION_WAIT_LOG_S == 0:
            log.warning(
                "waiting for an admin to provision %s (`shardplane auth provision`)",
                ", ".join(missing),
            )
        await asyncio.sleep(1.0)
        waited += 1.0


async def cluster_state(js: JetStreamContext) -> KeyValue:
    return await js.key_value(CLUSTER_STATE)


async def allow_atomic_batches(nc: Client, stream: str, api_prefix: str = "$JS.API") -> bool:
    """Turn on atomic batch publishing (``allow_atomic``, nats-server 2.12+) for ``stream``;
    True when the server stored the setting.

    nats-py's StreamConfig has no field for it, so this edits the stream's JSON config. An
    older server drops the unknown field (the answer says so), and the caller keeps writing
    one message at a time: an old server would store batch messages as plain ones, without
    their all-or-nothing guarantee, so batches are only sent where this returned True."""

    async def api(subject: str, payload: bytes) -> dict[str, Any]:
        reply = await nc.request(f"{api_prefix}.{subject}", payload)
        answer = json.loads(reply.data)
        return cast("dict[str, Any]", answer) if isinstance(answer, dict) else {}

    try:
        config = api_dict((await api(f"STREAM.INFO.{stream}", b"")).get("config"))
        if config.get("allow_atomic") is True:
            return True
        if not config:
            return False
        config["allow_atomic"] = True
        answer = await api(f"STREAM.UPDATE.{stream}", json.dumps(config).encode())
    except Exception as exc:  # no JetStream answer, not JSON...: plain writes work everywhere
        log.info("atomic batches not enabled on %s: %r", stream, exc)
        return False
    ok = api_dict(answer.get("config")).get("allow_atomic") is True
    if not ok:
        log.info("atomic batches not available on %s: %s", stream, str(answer)[:200])
    return ok


def api_dict(value: object) -> dict[str, Any]:
    return cast("dict[str, Any]", value) if isinstance(value, dict) else {}
