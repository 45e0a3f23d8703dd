"""Subject + payload -> a validated event, or the reason it is poison. Pure.

Besides msgspec's schema validation, the subject must agree with the payload: a sample for
``rig-b/3`` published on ``telemetry.gpu.rig-a.0`` would otherwise overwrite another device's
state, so it is poison, not telemetry.
"""

from __future__ import annotations

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

_GPU = subjects.TELEMETRY_GPU.split(".")
_NODE = subjects.TELEMETRY_NODE.split(".")
_ASSIGNED = subjects.PLACEMENT_ASSIGNED.split(".")
_STATUS_PREFIX = subjects.SHARD_STATUS.split(".")
_HEALTH_PREFIX = subjects.PLACEMENT_HEALTH.split(".")


class Poison(msgspec.Struct, frozen=True):
    reason: str


def decode_event(subject: str, data: bytes) -> Event | Poison:
    tokens = subject.split(".")
    try:
        if tokens[:2] == _GPU and len(tokens) == 4:
            if not data:
                return Poison("empty payload; expected a DeviceSample")
            sample = _SAMPLE.decode(data)
            if (sample.node, str(sample.index)) != (tokens[2], tokens[3]):
                return Poison(
                    f"subject names device {tokens[2]}/{tokens[3]} but the sample is for "
                    f"{sample.node}/{sample.index}"
                )
            return sample
        if tokens[:2] == _NODE and len(tokens) == 3:
            if not data:
                return Poison("empty payload; expected a NodeHeartbeat")
            heartbeat = _HEARTBEAT.decode(data)
            if heartbeat.node != tokens[2]:
                return Poison(
                    f"subject names node {tokens[2]} but the heartbeat is from {heartbeat.node}"
                )
            return heartbeat
        if tokens[:2] == _ASSIGNED and len(tokens) == 3:
            if not data:
                return Poison("empty payload; expected a ShardAssignment")
            assignment = _ASSIGNMENT.decode(data)
            if assignment.node != tokens[2]:
                return Poison(
                    f"subject names node {tokens[2]} but the assignment is for {assignment.node}"
                )
            return assignment
        if tokens[:2] == _STATUS_PREFIX and len(tokens) == 4:
            if not data:
                return Poison("empty payload; expected a ShardStatus")
            status = _STATUS.decode(data)
            if (status.node, status.instance_id) != (tokens[2], tokens[3]):
                return Poison(
                    f"subject names {tokens[2]}/{tokens[3]} but the status is from "
                    f"{status.node} for {status.instance_id}"
                )
            return status
        if tokens[:2] == _HEALTH_PREFIX and len(tokens) == 3:
            if not data:
                return Poison("empty payload; expected an InstanceHealth")
            health = _HEALTH.decode(data)
            if health.instance_id != tokens[2]:
                return Poison(
                    f"subject names instance {tokens[2]} but the verdict is on {health.instance_id}"
                )
            return health
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
        )
    except ValueError:
        return None
