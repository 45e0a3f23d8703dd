"""How a worker takes its assignments in: its durable consumer on ``placement.assigned.<node>``,
decoding (an assignment for another node or one that does not decode is dropped), and
dead-lettering what it will not act on; also how fetch errors are told apart and described.

Why apart from the worker: these are the worker's contact with the PLACEMENTS stream, each a
small function of the node's name; the worker keeps the state they feed (desired, held)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from shardplane.bus import codec, streams, subjects
from shardplane.bus.messages import ShardAssignment

# The worker's logger: these lines keep the name they had before this module was split off.
log = logging.getLogger("shardplane.agents.worker")


def durable_name(node: str) -> str:
    return f"worker-{node}"


async def subscribe(js: JetStreamContext, node: str, subject: str) -> Any:
    """The worker's durable pull subscription on its node's assignments."""
    # The config applies only when the durable is created; an existing one is reused as is.
    return await js.pull_subscribe(
        subject,
        durable=durable_name(node),
        stream=streams.PLACEMENTS,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
            max_ack_pending=1000,
            description=f"shard worker of {node}",
        ),
    )


async def ensure_streams(js: JetStreamContext) -> None:
    # Provisioning per worker is wasteful in a fleet of thousands; only do it when missing.
    try:
        await js.stream_info(streams.PLACEMENTS)
        await js.stream_info(streams.SHARDS)
    except NotFoundError:
        await streams.provision(js)


def decode_assignment(msg: Msg, node: str) -> ShardAssignment | None:
    """The assignment in ``msg`` when it is valid and for ``node``; None (logged) if not."""
    try:
        assignment = codec.decode(ShardAssignment, msg.data)
    except codec.DecodeError as exc:
        log.warning("worker %s: dropping invalid assignment on %s: %s", node, msg.subject, exc)
        return None
    if assignment.node != node:
        log.warning(
            "worker %s: dropping assignment for node %s delivered on %s",
            node,
            assignment.node,
            msg.subject,
        )
        return None
    return assignment


async def deadletter(js: JetStreamContext, msg: Msg, node: str, why: str | None = None) -> None:
    """Park an undecodable or unauthorised assignment on deadletter.<subject>, terminate it."""
    with contextlib.suppress(Exception):
        await js.publish(
            subjects.deadletter(msg.subject),
            msg.data,
            headers={"Shardplane-Reason": why or f"invalid ShardAssignment for worker {node}"},
            timeout=2.0,
        )
    with contextlib.suppress(Exception):
        await msg.term()


def idle_poll(exc: BaseException) -> bool:
    """True when a fetch just found nothing within its long poll: the worker's normal idle
    state, not a failure. nats-py says so with its own TimeoutError (FetchTimeoutError when
    heartbeats came), or, from some paths of ``fetch``, the builtin TimeoutError with an empty
    message; all are TimeoutError. Real trouble (consumer gone: 503/404, connection closed) is
    not."""
    return isinstance(exc, TimeoutError)


def describe_error(exc: BaseException) -> str:
    """The error's type and message (many nats-py errors have an empty message, so the type is
    the news; some already put it in the message)."""
    name, text = type(exc).__name__, str(exc).strip()
    if not text:
        return name
    return text if name in text else f"{name}: {text}"
