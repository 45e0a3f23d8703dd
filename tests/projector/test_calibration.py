"""Per-device calibration: stage step timings become the device's measured bandwidth, robust to
bad figures, kept across samples, and the planner plans with it (``calibrated: true``)."""

from __future__ import annotations

from typing import Any

from shardplane.bus.messages import DeviceSample, DeviceState, NodeHeartbeat, NodeState, ShardStatus
from shardplane.planner.fleet import build_fleet
from shardplane.projector.calibration import MIN_SAMPLES, WINDOW
from tests.projector.test_reducer import NOW, assign, fold

GB = 1e9
MEMORY: dict[str, Any] = {
    "memory_total_bytes": 80 * 2**30,
    "memory_free_bytes": 80 * 2**30,
    "memory_used_bytes": 0,
}


def timed(seq: int, step_ms: float | None, step_bytes: int = int(2 * GB)) -> ShardStatus:
    return ShardStatus(
        instance_id="i1",
        generation=1,
        node="a",
        stage=0,
        state="loaded",
        seq=seq,
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
