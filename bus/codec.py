"""Encoding and validation. Telemetry and status are MessagePack; placement.request speaks JSON
or MessagePack and is answered in the encoding it was asked in."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    InstanceState,
    NodeHeartbeat,
    NodeState,
    PlacementReply,
    PlacementRequest,
    ShardAssignment,
    ShardStatus,
)

Encoding = Literal["json", "msgpack"]
T = TypeVar("T")


class DecodeError(ValueError):
    """A payload that is not a valid message; ``str()`` says what was wrong, naming the field."""


_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()


def _decoders(kind: type[T]) -> tuple[msgspec.msgpack.Decoder[T], msgspec.json.Decoder[T]]:
    return msgspec.msgpack.Decoder(kind), msgspec.json.Decoder(kind)


_DECODERS: dict[type[Any], tuple[msgspec.msgpack.Decoder[Any], msgspec.json.Decoder[Any]]] = {
    kind: _decoders(kind)
    for kind in (
        DeviceSample,
        NodeHeartbeat,
        PlacementRequest,
        PlacementReply,
        ShardAssignment,
        ShardStatus,
        DeviceState,
        NodeState,
        InstanceState,
    )
}


def encode(message: msgspec.Struct, encoding: Encoding = "msgpack") -> bytes:
    if encoding == "json":
        return _json_encoder.encode(message)
    return _msgpack_encoder.encode(message)


def decode(kind: type[T], data: bytes, encoding: Encoding = "msgpack") -> T:
    """Decode and validate ``data`` as ``kind``; raises DecodeError naming what was wrong."""
    if not data:
        raise DecodeError(f"empty payload; expected a {kind.__name__}")
    pair = _DECODERS.get(kind)
    decoder = (pair[1] if encoding == "json" else pair[0]) if pair else None
    try:
        if decoder is not None:
            return decoder.decode(data)
        if encoding == "json":
            return msgspec.json.decode(data, type=kind)
        return msgspec.msgpack.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"invalid {kind.__name__}: {exc}") from exc


def sniff_encoding(data: bytes, content_type: str | None = None) -> Encoding:
    """JSON if the client said so or the body starts like a JSON object; MessagePack otherwise.

    A MessagePack map starts with 0x80-0x8f, 0xde or 0xdf, never with ``{`` or whitespace."""
    if content_type:
        lowered = content_type.lower()
        if "json" in lowered:
            return "json"
        if "msgpack" in lowered:
            return "msgpack"
    head = data.lstrip()[:1]
    return "json" if head in (b"{", b"[", b'"') or not data.strip() else "msgpack"


def to_builtins(message: msgspec.Struct) -> Any:
    return msgspec.to_builtins(message)
