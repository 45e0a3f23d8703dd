"""Every message type round-trips both encodings; invalid payloads name what was wrong."""

from __future__ import annotations

import msgspec
import pytest

from shardplane.bus import codec, keys, subjects
from shardplane.bus.codec import DecodeError
from shardplane.bus.ids import InvalidId, device_id, node_id, node_id_from_hostname, split_device_id
from shardplane.bus.messages import (
    DeviceSample,
    ErrorInfo,
    Excluded,
    ModelCard,
    NetInterface,
    NetLink,
    NodeHeartbeat,
    NodeState,
    NvLink,
    PlacementReply,
    PlacementRequest,
    ShardAssignment,
    ShardStatus,
    StageState,
)
from tests import kit

GIB = 1024**3

SAMPLE = kit.sample(
    "rig-a",
    0,
    7,
    uuid="GPU-1234",
    ts=1.7e9,
    vendor="nvidia",
    name="NVIDIA A100-SXM4-80GB",
    pci_bus_id="00000000:3B:00.0",
    memory_total_bytes=80 * GIB,
    memory_used_bytes=10 * GIB,
    memory_free_bytes=70 * GIB,
    utilization_gpu_pct=12.5,
    temperature_c=41.0,
    power_w=88.2,
    bandwidth_gbps=2039.0,
    throttle_reasons=("sw_thermal",),
    nvlinks=(NvLink(link=0, peer_pci_bus_id="00000000:3C:00.0"),),
    unsupported=("ecc_uncorrected",),
)
HEARTBEAT = NodeHeartbeat(
    node="rig-a",
    seq=1,
    ts=1.7e9,
    hostname="Rig-A.local",
    cpu_count=32,
    host_memory_bytes=256 * GIB,
    interfaces=(NetInterface(name="eth0", speed_mbps=25000.0),),
    links=(NetLink(peer="rig-b", gbps=25.0, latency_ms=0.05),),
    backend="nvml",
    skipped={"rocm": "ROCm library not found"},
    device_count=1,
)
CARD = ModelCard(
    name="tiny", layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=1000
)
REQUEST = PlacementRequest(model="llama-3.1-70b", instance_id="inst-1", exclude_nodes=("rig-c",))
FIGURES = {"weight_bytes": 10, "kv_bytes": 2, "bandwidth_gbps": 2039.0, "stage_ms": 1.0}
STAGE = kit.stage("rig-a", 0, 40, gpu="A100", hop_ms=0.1, **FIGURES)
REPLY = PlacementReply(
    ok=True,
    instance_id="inst-1",
    generation=1,
    model="llama-3.1-70b",
    stages=(STAGE,),
    excluded=(Excluded(device="rig-c/0", reason="offline"),),
)
ASSIGNMENT = kit.assignment(
    "inst-1", 1, "rig-a", 0, 1, model="llama-3.1-70b", layer_end=40, layers_total=80, ts=0.0
)
STATUS = kit.status("inst-1", 1, "rig-a", 0, "loaded", 3, ts=1.7e9, bytes_loaded=100)
EXAMPLES: list[msgspec.Struct] = [
    SAMPLE,
    HEARTBEAT,
    REQUEST,
    PlacementRequest(model=CARD),
    REPLY,
    PlacementReply(ok=False, error=ErrorInfo(code="unknown_model", message="no model 'x'")),
    ASSIGNMENT,
    STATUS,
    kit.device_state(SAMPLE),
    NodeState(heartbeat=HEARTBEAT, online=False, last_seen=1.7e9, offline_reason="silent"),
    kit.instance(
        "inst-1",
        (StageState(stage=0, node="rig-a", device="rig-a/0", layer_start=0, layer_end=4),),
        generation=2,
        state="pending",
    ),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_round_trip(message: msgspec.Struct, encoding: codec.Encoding) -> None:
    data = codec.encode(message, encoding)
    assert codec.decode(type(message), data, encoding) == message


def test_every_message_carries_a_schema_version() -> None:
    for message in EXAMPLES:
        assert msgspec.to_builtins(message)["v"] == 1


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SAMPLE.seq = 8  # type: ignore[misc]


def _bad(kind: type[msgspec.Struct], payload: object, encoding: codec.Encoding = "msgpack") -> str:
    data = msgspec.json.encode(payload) if encoding == "json" else msgspec.msgpack.encode(payload)
    with pytest.raises(DecodeError) as info:
        codec.decode(kind, data, encoding)
    return str(info.value)


def _sample(**changes: object) -> dict[str, object]:
    return {**msgspec.to_builtins(SAMPLE), **changes}


def test_negative_memory_is_rejected_naming_the_field() -> None:
    assert "memory_free_bytes" in _bad(DeviceSample, _sample(memory_free_bytes=-1))


def test_utilisation_out_of_range_is_rejected() -> None:
    assert "utilization_gpu_pct" in _bad(DeviceSample, _sample(utilization_gpu_pct=101))


def test_wrong_type_is_rejected_naming_the_field() -> None:
    message = _bad(DeviceSample, _sample(index="zero"))
    assert "index" in message and "int" in message


def test_missing_required_field_is_named() -> None:
    payload = _sample()
    del payload["uuid"]
    assert "uuid" in _bad(DeviceSample, payload)


def test_node_id_must_be_a_subject_token() -> None:
    assert "node" in _bad(DeviceSample, _sample(node="rig a:1"))
    assert "node" in _bad(NodeHeartbeat, {**msgspec.to_builtins(HEARTBEAT), "node": "Rig.A"})


def test_garbage_and_empty_bodies_are_rejected() -> None:
    for kind in (DeviceSample, NodeHeartbeat, ShardStatus, ShardAssignment):
        with pytest.raises(DecodeError):
            codec.decode(kind, b"\xc1\xff garbage")
        with pytest.raises(DecodeError, match="empty payload"):
            codec.decode(kind, b"")
    with pytest.raises(DecodeError):
        codec.decode(PlacementRequest, b"{not json", "json")


def test_request_rejects_unknown_fields_so_typos_are_heard() -> None:
    message = _bad(PlacementRequest, {"model": "x", "context_token": 4096}, "json")
    assert "context_token" in message


def test_request_constraints() -> None:
    assert "context_tokens" in _bad(PlacementRequest, {"model": "x", "context_tokens": 0}, "json")
    assert "memory_headroom" in _bad(
        PlacementRequest, {"model": "x", "memory_headroom": 1.5}, "json"
    )
    assert "objective" in _bad(PlacementRequest, {"model": "x", "objective": "speed"}, "json")
    assert "instance_id" in _bad(PlacementRequest, {"model": "x", "instance_id": "a b"}, "json")
    assert "model" in _bad(PlacementRequest, {"context_tokens": 5}, "json")


def test_request_defaults_from_minimal_json() -> None:
    req = codec.decode(PlacementRequest, b'{"model": "llama-3.1-70b"}', "json")
    assert (req.context_tokens, req.batch, req.objective, req.dry_run) == (
        8192,
        1,
        "throughput",
        False,
    )
    assert req.memory_headroom == pytest.approx(0.1)


def test_inline_model_card_in_request() -> None:
    req = codec.decode(PlacementRequest, codec.encode(PlacementRequest(model=CARD), "json"), "json")
    assert isinstance(req.model, ModelCard) and req.model.layers == 4


def test_old_readers_ignore_new_fields() -> None:
    """Additive evolution: a newer writer's extra field does not break this reader."""
    decoded = codec.decode(DeviceSample, msgspec.msgpack.encode(_sample(some_future_field=3)))
    assert decoded == SAMPLE


def test_sniff_encoding() -> None:
    assert codec.sniff_encoding(b' {"model": "x"}') == "json"
    assert codec.sniff_encoding(codec.encode(REQUEST)) == "msgpack"
    assert codec.sniff_encoding(codec.encode(REQUEST), "application/json") == "json"


def test_subjects_and_keys() -> None:
    assert subjects.gpu_sample("rig-a", 1) == "telemetry.gpu.rig-a.1"
    assert subjects.node_heartbeat("rig-a") == "telemetry.node.rig-a"
    assert subjects.assigned("rig-b") == "placement.assigned.rig-b"
    assert subjects.shard_status("rig-b", "i1") == "shard.status.rig-b.i1"
    assert subjects.sim_fault("rig-b") == "sim.fault.rig-b"  # `nats req sim.fault.<node>` users
    assert subjects.SIM_FAULT_ANY == "sim.fault.*"
    assert keys.device_key("rig-a", 0) == "devices.rig-a.0"
    assert keys.node_key("rig-a") == "nodes.rig-a"
    assert keys.instance_key("i1") == "instances.i1"


def test_ids() -> None:
    assert node_id_from_hostname("Rig-A.local") == "rig-a-local"
    assert device_id("rig-a", 3) == "rig-a/3"
    assert split_device_id("rig-a/3") == ("rig-a", 3)
    with pytest.raises(InvalidId, match="subject token"):
        node_id("rig:a")
    with pytest.raises(InvalidId):
        split_device_id("rig-a")
