"""Liveness as a function of time, for everyone who reads ``cluster_state``.

The projector writes ``online`` into each device and node, but a stored flag is only as true
as the last write: while the projector is down, or NATS is, or a stream has no leader, nobody
rewrites it, and a device that went silent minutes ago still says ``online``. So readers (the
API, ``shardplane status``, the planner) do not take the flag on trust: a value whose
``last_seen`` (stream time of its newest sample) is older than the TTL on the reader's own
clock is shown as offline with a ``stale`` reason, whatever the flag says. The flag can only
be made *less* online this way, never more: an offline device stays offline.

The reader's TTL is the projector's (3 heartbeat intervals, or ``SHARDPLANE_TTL``) plus a little
slack for the projector's own sweep cadence and clock skew between hosts, so a healthy system
never shows a reader contradicting its projector.
"""

from __future__ import annotations

import msgspec

from shardplane.bus.envnum import positive_float
from shardplane.bus.messages import DeviceState, NodeState

TTL_ENV = "SHARDPLANE_TTL"
TTL_FACTOR = 3.0  # offline after this many missed heartbeat intervals (as the projector)
DEFAULT_INTERVAL_S = 2.0
READER_SLACK_S = 1.0
STALE_PREFIX = "stale"


def ttl_from_env() -> float | None:
    return positive_float(TTL_ENV, "seconds")


def reader_ttl(node: NodeState | None, ttl_s: float | None = None) -> float:
    """How old a value may be before a reader calls it stale."""
    if ttl_s is not None:
        return ttl_s + READER_SLACK_S
    interval = node.heartbeat.interval_s if node is not None else DEFAULT_INTERVAL_S
    return TTL_FACTOR * (interval if interval > 0 else DEFAULT_INTERVAL_S) + READER_SLACK_S


def stale_reason(age_s: float) -> str:
    return f"{STALE_PREFIX}: no update for {age_s:.0f}s (projector or NATS behind?)"


def judge_device(
    state: DeviceState, node: NodeState | None, now: float, ttl_s: float | None = None
) -> DeviceState:
    """``state``, or a copy marked offline when its newest sample is older than the TTL."""
    age = now - state.last_seen
    if not state.online or age <= reader_ttl(node, ttl_s):
        return state
    return msgspec.structs.replace(state, online=False, offline_reason=stale_reason(age))


def judge_node(state: NodeState, now: float, ttl_s: float | None = None) -> NodeState:
    age = now - state.last_seen
    if not state.online or age <= reader_ttl(state, ttl_s):
        return state
    return msgspec.structs.replace(state, online=False, offline_reason=stale_reason(age))
