"""Encoding and validation. Telemetry and status are MessagePack; placement.request speaks JSON
or MessagePack and is answered in the encoding it was asked in.

Every decode is total: whatever the bytes, it returns a valid message or raises DecodeError
saying what was wrong. Limits come before parsing (size; JSON nesting depth, counted without
parsing), and a structure too deep for the parser's own recursion (a MessagePack value nested
a thousand levels, in a field a reader would skip) is a DecodeError too, never RecursionError.

The encoding rule (:func:`sniff_encoding`): an explicit Content-Type (``json``/``msgpack``)
wins; otherwise JSON when the body is empty, starts with a UTF-8 BOM or with any ASCII byte
(``{``, ``[``, whitespace, but also ``null`` or ``123``, which get a JSON error), MessagePack
when it starts with any other byte. Every MessagePack message is a map (0x80-0x8f, 0xde, 0xdf);
an ASCII first byte would be a MessagePack positive integer, never a message.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

import msgspec

from shardplane.bus import messages
from shardplane.bus.errors import BusError

Encoding = Literal["json", "msgpack"]
T = TypeVar("T")


class DecodeError(BusError, ValueError):
    """A payload that is not a valid message; ``str()`` says what was wrong, naming the field."""


MAX_PAYLOAD = 8 * 1024 * 1024  # the server's max_payload (nats.conf): nothing larger is a message
MAX_DEPTH = 32  # the deepest any message nests is 4 (a card in a request); 32 leaves room
BOM = b"\xef\xbb\xbf"
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?')
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(data: bytes) -> int:
    """The deepest ``[``/``{`` nesting in ``data``, brackets inside strings not counted, found
    without parsing (so before a parser can recurse); when the brackets are so few that no
    nesting could pass the limit, just their count (an upper bound)."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return data.count(b"[") + data.count(b"{")
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b"", data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def check_limits(data: bytes, encoding: Encoding, what: str = "message") -> None:
    """DecodeError when ``data`` is too large, or JSON nested deeper than MAX_DEPTH."""
    if len(data) > MAX_PAYLOAD:
        raise DecodeError(f"{what} of {len(data):,} bytes is over the {MAX_PAYLOAD:,}-byte limit")
    if encoding == "json" and (depth := json_depth(data)) > MAX_DEPTH:
        raise DecodeError(f"{what} nests {depth} levels deep; at most {MAX_DEPTH} are accepted")


_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()


def _decoders(kind: type[T]) -> tuple[msgspec.msgpack.Decoder[T], msgspec.json.Decoder[T]]:
    return msgspec.msgpack.Decoder(kind), msgspec.json.Decoder(kind)


_DECODERS: dict[type[Any], tuple[msgspec.msgpack.Decoder[Any], msgspec.json.Decoder[Any]]] = {
    kind: _decoders(kind)
    for kind in (
        messages.DeviceSample,
        messages.NodeHeartbeat,
        messages.PlacementRequest,
        messages.PlacementReply,
        messages.ShardAssignment,
        messages.ShardStatus,
        messages.DeviceState,
        messages.NodeState,
        messages.InstanceState,
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
    check_limits(data, encoding, kind.__name__)
    if encoding == "json" and data.startswith(BOM):
        data = data[len(BOM) :]
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
    except RecursionError:
        raise DecodeError(f"invalid {kind.__name__}: nested too deep to read") from None


def sniff_encoding(data: bytes, content_type: str | None = None) -> Encoding:
    """The module's rule: Content-Type when it names json or msgpack; else JSON for an empty
    body, a UTF-8 BOM or an ASCII first byte, MessagePack for any other first byte."""
    if content_type:
        lowered = content_type.lower()
        if "json" in lowered:
            return "json"
        if "msgpack" in lowered:
            return "msgpack"
    if not data or data.startswith(BOM) or data[0] < 0x80:
        return "json"
    return "msgpack"


def peek_identity(data: bytes, encoding: Encoding) -> tuple[str | None, str | None]:
    """The ``instance_id`` and ``model`` a request that failed to decode meant, where they can
    still be read (within the limits), so its error reply can name them; (None, None) else."""
    try:
        check_limits(data, encoding)
        raw = data[len(BOM) :] if data.startswith(BOM) else data
        doc: Any = msgspec.json.decode(raw) if encoding == "json" else msgspec.msgpack.decode(raw)
    except (DecodeError, msgspec.DecodeError, RecursionError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    fields: dict[Any, Any] = doc  # pyright: ignore[reportUnknownVariableType]
    ident, model = fields.get("instance_id"), fields.get("model")
    if isinstance(model, dict):
        model = fields["model"].get("name")
    return (
        ident[:64] if isinstance(ident, str) and _TOKEN.match(ident) else None,
        model[:128] if isinstance(model, str) and model else None,
    )


_TOKEN = re.compile(r"^[a-z0-9_-]{1,64}$")


def to_builtins(message: msgspec.Struct) -> Any:
    return msgspec.to_builtins(message)
