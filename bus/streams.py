"""Idempotent provisioning of the streams and KV buckets the pipeline runs on."""

from __future__ import annotations

import json
import logging
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

log = logging.getLogger(__name__)

TELEMETRY = "TELEMETRY"
PLACEMENTS = "PLACEMENTS"
SHARDS = "SHARDS"
DEADLETTER = "DEADLETTER"
CLUSTER_STATE = "cluster_state"
LEDGER = "placement_ledger"  # the planners' memory ledger (planner-owned, CAS-guarded)

DAY = 24 * 3600.0
PLACEMENT_CONSUMERS = 100_000


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    """The streams, with limits that keep a long-running fleet's store bounded.

    Telemetry keeps a short history per subject (the KV has the newest; the stream is the
    replay buffer for the projector), placements and statuses keep enough to rebuild state.
    """
    return [
        StreamConfig(
            name=TELEMETRY,
            subjects=["telemetry.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=64,
            max_age=3600.0,
            max_bytes=2 * 1024**3,
            discard=DiscardPolicy.OLD,
            duplicate_window=120.0,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=PLACEMENTS,
            subjects=["placement.assigned.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=30 * DAY,
            max_msgs_per_subject=10_000,
            max_bytes=512 * 1024**2,
            # Left unset, nats-server refuses the 1,001st consumer (10026); a fleet of real hosts
            # runs one agent, so one assignment consumer, per host.
            max_consumers=PLACEMENT_CONSUMERS,
            duplicate_window=120.0,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=SHARDS,
            subjects=["shard.status.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=7 * DAY,
            max_msgs_per_subject=256,
            max_bytes=512 * 1024**2,
            duplicate_window=120.0,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=DEADLETTER,
            subjects=["deadletter.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=7 * DAY,
            max_msgs=100_000,
            max_bytes=256 * 1024**2,
            num_replicas=replicas,
        ),
    ]


def bucket_configs(replicas: int = 1) -> list[KeyValueConfig]:
    return [
        KeyValueConfig(
            bucket=CLUSTER_STATE,
            description="materialised cluster state; written by the projector only",
            history=1,
            storage=StorageType.FILE,
            replicas=replicas,
            direct=True,
        ),
        KeyValueConfig(
            bucket=LEDGER,
            description="memory promised to placed instances; planners update it by CAS",
            history=1,
            storage=StorageType.FILE,
            replicas=replicas,
            direct=True,
        ),
    ]


async def provision(js: JetStreamContext, replicas: int = 1) -> None:
    """Create or update every stream and bucket. Safe to run any number of times."""
    for config in stream_configs(replicas):
        assert config.name is not None
        try:
            await js.stream_info(config.name)
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)
    for bucket in bucket_configs(replicas):
        try:
            await js.key_value(bucket.bucket)
        except (NotFoundError, BadRequestError):
            await js.create_key_value(bucket)


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
