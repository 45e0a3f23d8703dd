"""Idempotent provisioning of the streams and KV buckets the pipeline runs on."""

from __future__ import annotations

import logging

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
