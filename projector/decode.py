"""Subject + payload -> a validated event, or the reason it is poison. Pure.

Besides msgspec's schema validation, the subject must agree with the payload: a sample for
``rig-b/3`` published on ``telemetry.gpu.rig-a.0`` would otherwise overwrite another device's
state, so it is poison, not telemetry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from shardplane.bus import subjects
from shardplane.bus.messages import (
    DeviceSample,
    InstanceHealth,
    NodeHeartbeat,
    ShardAssignment,
    ShardStatus,
)
from shardplane.projector.reducer import Event

_SAMPLE = msgspec.msgpack.Decoder(DeviceSample)
_HEARTBEAT = msgspec.msgpack.Decoder(NodeHeartbeat)
_ASSIGNMENT = msgspec.msgpack.Decoder(ShardAssignment)
_STATUS = msgspec.msgpack.Decoder(ShardStatus)
_HEALTH = msgspec.msgpack.Decoder(InstanceHealth)

_GPU = tuple(subjects.TELEMETRY_GPU.split("."))
_NODE = tuple(subjects.TELEMETRY_NODE.split("."))
_ASSIGNED = tuple(subjects.PLACEMENT_ASSIGNED.split("."))
_STATUS_PREFIX = tuple(subjects.SHARD_STATUS.split("."))
_HEALTH_PREFIX = tuple(subjects.PLACEMENT_HEALTH.split("."))


class Poison(msgspec.Struct, frozen=True):
    reason: str


# Each check says how the payload disagrees with the subject it came on (None: it agrees).
def _sample_mismatch(s: DeviceSample, t: list[str]) -> str | None:
    if (s.node, str(s.index)) == (t[2], t[3]):
        return None
    return f"subject names device {t[2]}/{t[3]} but the sample is for {s.node}/{s.index}"


def _heartbeat_mismatch(h: NodeHeartbeat, t: list[str]) -> str | None:
    return (
        None if h.node == t[2] else f"subject names node {t[2]} but the heartbeat is from {h.node}"
    )


def _assignment_mismatch(a: ShardAssignment, t: list[str]) -> str | None:
    return (
        None if a.node == t[2] else f"subject names node {t[2]} but the assignment is for {a.node}"
    )


def _status_mismatch(s: ShardStatus, t: list[str]) -> str | None:
    if (s.node, s.instance_id) == (t[2], t[3]):
        return None
    return f"subject names {t[2]}/{t[3]} but the status is from {s.node} for {s.instance_id}"


def _health_mismatch(h: InstanceHealth, t: list[str]) -> str | None:
    if h.instance_id == t[2]:
        return None
    return f"subject names instance {t[2]} but the verdict is on {h.instance_id}"


@dataclass(frozen=True, slots=True)
class _Route:
    """Subjects ``prefix.*`` of ``size`` tokens carry ``expected``, read by ``decoder``."""

    prefix: tuple[str, ...]
    size: int
    expected: str
    decoder: msgspec.msgpack.Decoder[Any]
    mismatch: Callable[[Any, list[str]], str | None]


_ROUTES = (
    _Route(_GPU, 4, "a DeviceSample", _SAMPLE, _sample_mismatch),
    _Route(_NODE, 3, "a NodeHeartbeat", _HEARTBEAT, _heartbeat_mismatch),
    _Route(_ASSIGNED, 3, "a ShardAssignment", _ASSIGNMENT, _assignment_mismatch),
    _Route(_STATUS_PREFIX, 4, "a ShardStatus", _STATUS, _status_mismatch),
    _Route(_HEALTH_PREFIX, 3, "an InstanceHealth", _HEALTH, _health_mismatch),
)


def decode_event(subject: str, data: bytes) -> Event | Poison:
    tokens = subject.split(".")
    head = tuple(tokens[:2])
    try:
        for route in _ROUTES:
            if head != route.prefix or len(tokens) != route.size:
                continue
            if not data:
                return Poison(f"empty payload; expected {route.expected}")
            event: Event = route.decoder.decode(data)
            mismatch = route.mismatch(event, tokens)
            return event if mismatch is None else Poison(mismatch)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return Poison(f"invalid payload: {exc}")
    except RecursionError:  # nested past the parser's depth (in a field it would skip)
        return Poison("invalid payload: nested too deep to read")
    return Poison(f"unexpected subject {subject!r}")


class AckInfo(msgspec.Struct, frozen=True):
    """What the JetStream ack subject says about a delivered message."""

    stream: str
    consumer: str
    delivered: int
    stream_seq: int
    timestamp: float  # when the stream stored it, seconds since the Unix epoch
    consumer_seq: int = 0  # the delivery's sequence on its consumer (every delivery counts)


def parse_ack_subject(reply: str) -> AckInfo | None:
    """Parse ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (and the
    v2 form with domain and account hash), about 10x faster than nats-py's ``msg.metadata``,
    which builds a datetime for every message."""
    tokens = reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    if len(tokens) == 9:
        offset = 2
    elif len(tokens) >= 11:
        offset = 4  # $JS.ACK.<domain>.<account hash>.<stream>...
    else:
        return None
    try:
        return AckInfo(
            stream=tokens[offset],
            consumer=tokens[offset + 1],
            delivered=int(tokens[offset + 2]),
            stream_seq=int(tokens[offset + 3]),
            timestamp=int(tokens[offset + 5]) / 1e9,
            consumer_seq=int(tokens[offset + 4]),
        )
    except ValueError:
        return None
