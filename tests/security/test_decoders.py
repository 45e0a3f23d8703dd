"""Every decoder is total: arbitrary bytes give a message or a DecodeError naming what was
wrong, never another exception; limits apply before parsing; model cards are strict."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardplane.bus import codec
from shardplane.bus.messages import (
    DeviceSample,
    ModelCard,
    NodeHeartbeat,
    PlacementRequest,
    ShardAssignment,
    ShardStatus,
)
from shardplane.projector.decode import Poison, decode_event

KINDS = (DeviceSample, NodeHeartbeat, PlacementRequest, ShardAssignment, ShardStatus)
CARD = {
    "name": "c",
    "layers": 2,
    "hidden": 64,
    "intermediate": 128,
    "heads": 8,
    "kv_heads": 2,
    "vocab": 100,
}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["json", "msgpack"]))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes, encoding: str) -> None:
    for kind in KINDS:
        try:
            codec.decode(kind, data, encoding)  # type: ignore[arg-type]
        except codec.DecodeError as exc:
            assert str(exc)


def _nested(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return opener * depth + closer * depth


@pytest.mark.parametrize("depth", [40, 1000, 100_000])
def test_deep_json_is_refused_before_parsing(depth: int) -> None:
    data = b'{"model":"x","zz":' + _nested(depth) + b"}"
    with pytest.raises(codec.DecodeError, match=f"nests {depth + 1} levels deep; at most 32"):
        codec.decode(PlacementRequest, data, "json")


def test_brackets_inside_strings_do_not_count() -> None:
    data = b'{"model":"' + b"[" * 500 + b'\\"]"}'
    assert codec.json_depth(data) == 1
    assert codec.decode(PlacementRequest, data, "json").model == "[" * 500 + '"]'
    assert codec.json_depth(b'{"a":' + _nested(40) + b"}") == 41


@pytest.mark.parametrize("kind", [DeviceSample, NodeHeartbeat])
def test_deep_msgpack_in_a_skipped_field_is_a_decode_error(kind: type) -> None:
    valid = {"node": "a", "index": 0, "uuid": "u", "seq": 0, "ts": 0.0}
    packed = msgspec.msgpack.encode(valid)
    data = bytes([packed[0] + 1]) + packed[1:] + b"\xa2zz" + b"\x91" * 5000 + b"\x90"
    with pytest.raises(codec.DecodeError, match="nested too deep"):
        codec.decode(kind, data)
    poison = decode_event("telemetry.gpu.a.0", data)
    assert isinstance(poison, Poison) and "nested too deep" in poison.reason


def test_oversize_payload_is_refused() -> None:
    with pytest.raises(codec.DecodeError, match="over the 8,388,608-byte limit"):
        codec.decode(PlacementRequest, b" " * (codec.MAX_PAYLOAD + 1), "json")


def test_encoding_rule() -> None:
    request = codec.encode(PlacementRequest(model="x"))
    assert codec.sniff_encoding(request) == "msgpack"
    for body in (b"{}", b"[1]", b" {}", b"\n{}", b"null", b"123", b'"x"', b""):
        assert codec.sniff_encoding(body) == "json", body
    assert codec.sniff_encoding(codec.BOM + b'{"model":"x"}') == "json"
    assert codec.decode(PlacementRequest, codec.BOM + b'{"model":"x"}', "json").model == "x"
    assert codec.sniff_encoding(request, "application/json") == "json"
    assert codec.sniff_encoding(b"{}", "application/msgpack") == "msgpack"


def test_model_card_refuses_unknown_fields() -> None:
    body = {"model": {**CARD, "bytes_per_parm": 1.0}}
    with pytest.raises(codec.DecodeError, match="unknown field `bytes_per_parm`"):
        codec.decode(PlacementRequest, msgspec.json.encode(body), "json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"heads": 128}, r"heads \(128\) exceed hidden \(64\): head_dim would be 0"),
        ({"kv_heads": 3}, r"kv_heads \(3\) must divide heads \(8\)"),
        ({"kv_heads": 16}, r"kv_heads \(16\) must divide heads \(8\)"),
        ({"experts": 2, "experts_per_token": 4}, r"experts_per_token \(4\) exceeds experts"),
        ({"layers": 0}, r"Expected `int` >= 1"),
        ({"hidden": -5}, r"Expected `int` >= 1"),
        # Found by the fuzz bench: a vocab of 1e30 reached CP-SAT as a float coefficient.
        ({"vocab": 10**30}, r"Expected `int` <= 4194304 - at `\$.model.vocab`"),
        ({"experts": 5000}, r"Expected `int` <= 1024"),
    ],
)
def test_model_card_sizes_must_agree(change: dict[str, int], message: str) -> None:
    body = {"model": {**CARD, **change}}
    with pytest.raises(codec.DecodeError, match=message):
        codec.decode(PlacementRequest, msgspec.json.encode(body), "json")
    msgspec.convert(CARD, ModelCard)  # the unchanged card is fine


def test_peek_identity_reads_what_it_can() -> None:
    assert codec.peek_identity(b'{"model":"m","instance_id":"i-1","x":1}', "json") == ("i-1", "m")
    assert codec.peek_identity(b'{"model":{"name":"card"},"instance_id":"BAD ID"}', "json") == (
        None,
        "card",
    )
    assert codec.peek_identity(b"[" * 100 + b"]" * 100, "json") == (None, None)
    assert codec.peek_identity(b"\xc1", "msgpack") == (None, None)
