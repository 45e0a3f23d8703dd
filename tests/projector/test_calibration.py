"""Per-device calibration: stage step timings become the device's measured bandwidth, robust to
bad figures, kept across samples, and the planner plans with it (``calibrated: true``)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from shardplane.bus.messages import DeviceSample, DeviceState, NodeHeartbeat, NodeState, ShardStatus
from shardplane.planner.fleet import build_fleet
from shardplane.projector.calibration import MIN_SAMPLES, WINDOW
from tests import kit
from tests.projector.test_reducer import NOW, assign, fold

GB = 1e9
MEMORY: dict[str, Any] = {
    "memory_total_bytes": 80 * 2**30,
    "memory_free_bytes": 80 * 2**30,
    "memory_used_bytes": 0,
}


def timed(seq: int, step_ms: float | None, step_bytes: int = int(2 * GB)) -> ShardStatus:
    return kit.status(
        "i1",
        1,
        "a",
        0,
        "loaded",
        seq,
        ts=1.0 + seq / 100,
        device="a/0",
        step_ms=step_ms,
        step_bytes=step_bytes,
    )


def device_after(statuses: list[ShardStatus]) -> DeviceState:
    gpu = DeviceSample(
        node="a", index=0, uuid="G", seq=1, ts=NOW, name="NVIDIA A100-SXM4-80GB", **MEMORY
    )
    events = [(gpu, NOW - 1), (assign(1, "a", 0), 1.0)] + [(s, 1.5) for s in statuses]
    device = fold(events).get("devices.a.0")
    assert isinstance(device, DeviceState)
    return device


def test_step_timings_become_the_devices_measured_bandwidth() -> None:
    # 2 GB read in 1000 ms is 2 GB/s; nothing is claimed before MIN_SAMPLES figures.
    assert device_after([timed(i, 1000.0) for i in range(1, MIN_SAMPLES)]).measured_gbps is None
    device = device_after([timed(i, 1000.0) for i in range(1, MIN_SAMPLES + 1)])
    assert device.measured_gbps == 2.0


def test_zeros_and_outliers_cannot_poison_it() -> None:
    statuses = [timed(1, 0.0), timed(2, None), timed(3, 1000.0, step_bytes=0)]  # no figure
    statuses += [
        timed(4, 1000.0),
        timed(5, 0.001),
        timed(6, 1000.0),
        timed(7, 1e9),
        timed(8, 1000.0),
    ]
    device = device_after(statuses)
    assert device.measured_gbps == 2.0  # median of 2, 2e6, 2, 2e-6, 2
    assert len(device.measured_gbps_samples) == 5
    many = device_after([timed(i, 1000.0 if i % 2 else 500.0) for i in range(1, 30)])
    assert len(many.measured_gbps_samples) == WINDOW  # a window, not all history


def test_new_samples_and_heartbeats_keep_the_calibration() -> None:
    device = device_after([timed(i, 1000.0) for i in range(1, 4)])
    later = DeviceSample(node="a", index=0, uuid="G", seq=2, ts=NOW, name="NVIDIA A100-SXM4-80GB")
    view = fold([(later, NOW - 0.5), (NodeHeartbeat(node="a", seq=1, ts=NOW), NOW - 0.5)])
    view.set("devices.a.0", device)
    view = fold([(later, NOW - 0.4)], view=view)
    kept = view.get("devices.a.0")
    assert isinstance(kept, DeviceState) and kept.measured_gbps == 2.0


def test_the_planner_uses_the_measured_bandwidth_and_says_so() -> None:
    device = device_after([timed(i, 1000.0) for i in range(1, 4)])
    node = NodeState(heartbeat=NodeHeartbeat(node="a", seq=1, ts=NOW), online=True, last_seen=NOW)
    calibrated = build_fleet([device], {"a": node}).devices[0]
    assert calibrated.calibrated and calibrated.bandwidth_gbps == 2.0
    plain = build_fleet(
        [DeviceState(sample=device.sample, online=True, last_seen=NOW)], {"a": node}
    )
    assert not plain.devices[0].calibrated and plain.devices[0].bandwidth_gbps > 1000


def stepped(
    seq: int, step_ms: float, rows: int, flops: float, executor: str | None = None
) -> ShardStatus:
    return msgspec.structs.replace(
        timed(seq, step_ms), step_rows=rows, step_flops=flops, executor=executor
    )


def device_of(
    vendor: Literal["nvidia", "amd", "sim", "cpu"], statuses: list[ShardStatus]
) -> DeviceState:
    sample = DeviceSample(
        node="a", index=0, uuid="G", seq=1, ts=NOW, name="NVIDIA A100-SXM4-80GB", vendor=vendor, **MEMORY
    )  # fmt: skip
    events = [(sample, NOW - 1), (assign(1, "a", 0), 1.0)] + [(s, 1.5) for s in statuses]
    device = fold(events).get("devices.a.0")
    assert isinstance(device, DeviceState)
    return device


def test_multi_sequence_steps_calibrate_compute_not_bandwidth() -> None:
    # Batch 1: 2 GB in 1000 ms = 2 GB/s. Batch 4: 8 TFLOP in 2000 ms = 4 TFLOPS; its bytes
    # over its time (1 GB/s) must not drag the bandwidth down.
    ones = [stepped(i, 1000.0, 1, 1e12) for i in range(1, 4)]
    fours = [stepped(i, 2000.0, 4, 8e12) for i in range(4, 7)]
    fours.append(stepped(7, 0.0, 4, 8e12))  # no figure
    fours.append(stepped(8, 2000.0, 4, 0.0))  # no FLOPs: ignored
    device = device_of("nvidia", ones + fours)
    assert device.measured_gbps == 2.0
    assert device.measured_tflops == 4.0
    assert len(device.measured_tflops_samples) == 3
    node = NodeState(heartbeat=NodeHeartbeat(node="a", seq=1, ts=NOW), online=True, last_seen=NOW)
    planned = build_fleet([device], {"a": node}).devices[0]
    assert planned.calibrated and planned.tflops == 4.0 and planned.bandwidth_gbps == 2.0


def test_host_substitute_steps_do_not_calibrate_a_gpu() -> None:
    # A simulated A100 whose stage ran in numpy on the host: kept apart, datasheet figures stay.
    host = [stepped(i, 1000.0, 1, 1e12, "numpy-cpu") for i in range(1, 5)]
    host += [stepped(i, 2000.0, 4, 8e12, "torch-cpu") for i in range(5, 9)]
    sim = device_of("sim", host)
    assert sim.measured_gbps is None and sim.measured_tflops is None
    assert sim.host_substitute_steps == 8
    node = NodeState(heartbeat=NodeHeartbeat(node="a", seq=1, ts=NOW), online=True, last_seen=NOW)
    planned = build_fleet([sim], {"a": node}).devices[0]
    assert not planned.calibrated and planned.bandwidth_gbps > 1000
    # The same steps on the GPU itself, or host steps for a CPU device, do calibrate.
    gpu = [stepped(i, 1000.0, 1, 1e12, "torch-cuda:0") for i in range(1, 4)]
    assert device_of("nvidia", gpu).measured_gbps == 2.0
    assert device_of("cpu", host).measured_gbps == 2.0
    assert device_of("cpu", host).measured_tflops == 4.0
