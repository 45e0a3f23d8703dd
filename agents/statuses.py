"""Publishing a shard's status on ``shard.status.<node>.<instance>`` so that it survives a
leader election and is stored once.

Why its own module: the retry and the message id rule (epoch and seq, so a restarted
worker's statuses are not taken for duplicates) are what readers rely on, apart from the
worker's reconciling."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext

from shardplane.bus import codec, subjects
from shardplane.bus.messages import ShardStatus
from shardplane.bus.retry import retrying

# The worker's logger: these lines keep the name they had before this module was split off.
log = logging.getLogger("shardplane.agents.worker")


async def publish_status(js: JetStreamContext, status: ShardStatus) -> None:
    """Publish to SHARDS, retrying through a leader election (bus.retry) with the same
    Nats-Msg-Id (nats-py does not retry a publish that got no stream answer; the id makes a
    retry that did land a no-op)."""
    subject = subjects.shard_status(status.node, status.instance_id)
    data = codec.encode(status)
    # The epoch is in the id because seq restarts with each incarnation, and a restarted worker's
    # statuses must not be dropped as duplicates of its predecessor's.
    msg_id = f"{status.node}.{status.instance_id}.{status.epoch:.6f}.{status.seq}"
    try:
        await retrying(
            lambda: js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}, timeout=2.0),
            f"status {status.state} on {subject}",
        )
    except Exception as exc:  # past the election deadline: a later status supersedes it
        log.warning("status %s on %s not stored: %s", status.state, subject, exc)
