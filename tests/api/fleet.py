"""A small simulated fleet written straight into the ``cluster_state`` KV bucket.

The projector owns that bucket in production; the API only reads it, so the API's tests write
the documented value types (DeviceState, NodeState, InstanceState) themselves: that is the
contract between the two, and it keeps these tests independent of the projector's timing.
The fleet mirrors fleets/demo.toml: an A100 box, two 4090s, a 3060 with a P40, and an MI250X
box whose two GCDs are joined by Infinity Fabric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from nats.js.kv import KeyValue

from shardplane.bus import codec, keys
from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    InstanceState,
    NetLink,
    NodeHeartbeat,
    NodeState,
    NvLink,
    ShardState,
    StageState,
)

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    node: str
    index: int
    name: str
    vendor: str
    total_gib: float
    bandwidth_gbps: float
    pci_bus_id: str
    pcie_gen: int = 4
    pcie_width: int = 16


FLEET: tuple[Gpu, ...] = (
    Gpu("rig-a", 0, "NVIDIA A100-SXM4-80GB", "nvidia", 80, 2039.0, "00000000:3B:00.0"),
    Gpu("rig-b", 0, "NVIDIA GeForce RTX 4090", "nvidia", 24, 1008.0, "00000000:01:00.0"),
    Gpu("rig-b", 1, "NVIDIA GeForce RTX 4090", "nvidia", 24, 1008.0, "00000000:02:00.0"),
    Gpu("rig-c", 0, "NVIDIA GeForce RTX 3060", "nvidia", 12, 360.0, "00000000:01:00.0", 4, 8),
    Gpu("rig-c", 1, "Tesla P40", "nvidia", 24, 346.0, "00000000:02:00.0", 3, 16),
    Gpu("rig-d", 0, "AMD Instinct MI250X", "amd", 64, 1600.0, "0000:c1:00.0"),
    Gpu("rig-d", 1, "AMD Instinct MI250X", "amd", 64, 1600.0, "0000:c6:00.0"),
)
NODES = ("rig-a", "rig-b", "rig-c", "rig-d")
NET: dict[str, tuple[NetLink, ...]] = {
    "rig-a": (
        NetLink(peer="rig-b", gbps=25.0, latency_ms=0.05),
        NetLink(peer="rig-c", gbps=10.0, latency_ms=0.2),
        NetLink(peer="rig-d", gbps=100.0, latency_ms=0.01),
    ),
    "rig-b": (
        NetLink(peer="rig-a", gbps=25.0, latency_ms=0.05),
        NetLink(peer="rig-c", gbps=10.0, latency_ms=0.2),
        NetLink(peer="rig-d", gbps=10.0, latency_ms=0.2),
    ),
    "rig-c": (NetLink(peer="rig-d", gbps=10.0, latency_ms=0.2),),
    "rig-d": (),
}


def uuid_of(gpu: Gpu) -> str:
    return f"GPU-{gpu.node}-{gpu.index:02d}-0000-4000-8000"


def sample(gpu: Gpu, *, seq: int = 1, ts: float | None = None, **figures: Any) -> DeviceSample:
    ts = time.time() if ts is None else ts
    used_gib = float(figures.pop("used_gib", 2.0 + gpu.index))
    nvlinks: tuple[NvLink, ...] = ()
    if gpu.node == "rig-d":
        peer = next(g for g in FLEET if g.node == "rig-d" and g.index != gpu.index)
        nvlinks = tuple(NvLink(link=i, peer_uuid=uuid_of(peer), gbps=50.0) for i in range(4))
    base: dict[str, object] = {
        "utilization_gpu_pct": 10.0 + 7 * gpu.index,
        "utilization_memory_pct": 5.0,
        "temperature_c": 45.0 + gpu.index,
        "power_w": 120.5,
        "power_limit_w": 300.0,
        "sm_clock_mhz": 1410.0,
        "memory_clock_mhz": 1215.0,
    }
    base.update(figures)
    return DeviceSample(
        node=gpu.node,
        index=gpu.index,
        uuid=uuid_of(gpu),
        seq=seq,
        ts=ts,
        vendor=gpu.vendor,  # type: ignore[arg-type]
        name=gpu.name,
        pci_bus_id=gpu.pci_bus_id,
        memory_total_bytes=int(gpu.total_gib * GIB),
        memory_used_bytes=int(used_gib * GIB),
        memory_free_bytes=int((gpu.total_gib - used_gib) * GIB),
        bandwidth_gbps=gpu.bandwidth_gbps,
        pcie_gen=gpu.pcie_gen,
        pcie_width=gpu.pcie_width,
        nvlinks=nvlinks,
        **base,  # type: ignore[arg-type]
    )


def device_state(gpu: Gpu, *, online: bool = True, seq: int = 1, **figures: Any) -> DeviceState:
    s = sample(gpu, seq=seq, **figures)
    return DeviceState(
        sample=s, online=online, last_seen=s.ts, offline_reason=None if online else "silent"
    )


def node_state(node: str, *, online: bool = True) -> NodeState:
    now = time.time()
    hb = NodeHeartbeat(
        node=node,
        seq=1,
        ts=now,
        hostname=f"{node}.lab",
        links=NET[node],
        interconnect="xgmi" if node == "rig-d" else "pcie",
        backend="sim",
        device_count=sum(1 for g in FLEET if g.node == node),
    )
    return NodeState(heartbeat=hb, online=online, last_seen=now)


def instance_state(instance_id: str = "llama-demo", state: str = "loading") -> InstanceState:
    stages = (
        StageState(
            stage=0, node="rig-a", device="rig-a/0", layer_start=0, layer_end=50, state="loaded"
        ),
        StageState(
            stage=1, node="rig-d", device="rig-d/0", layer_start=50, layer_end=80, state="loading"
        ),
    )
    return InstanceState(
        instance_id=instance_id,
        model="llama-3.1-70b",
        generation=1,
        stage_count=2,
        stages=stages,
        state=state,  # type: ignore[arg-type]
        updated=time.time(),
    )


async def put_device(kv: KeyValue, gpu: Gpu, **kwargs: Any) -> int:
    return await kv.put(
        keys.device_key(gpu.node, gpu.index), codec.encode(device_state(gpu, **kwargs))
    )


async def write_fleet(kv: KeyValue) -> None:
    for node in NODES:
        await kv.put(keys.node_key(node), codec.encode(node_state(node)))
    for gpu in FLEET:
        await put_device(kv, gpu)


async def write_history(kv: KeyValue, points: int = 40, step_s: float = 5.0) -> None:
    """Older samples for every device, ending with one stamped now, so the dashboard's charts
    have minutes of history to draw (the API keeps a ring per device)."""
    import math

    now = time.time()
    for i in range(points + 1):
        ts = now - (points - i) * step_s
        for n, gpu in enumerate(FLEET):
            wave = math.sin(i / 5.0 + n)
            await put_device(
                kv,
                gpu,
                seq=i + 1,
                ts=ts,
                utilization_gpu_pct=max(0.0, min(100.0, 45.0 + 40.0 * wave)),
                temperature_c=50.0 + 12.0 * math.sin(i / 9.0 + n),
                used_gib=gpu.total_gib * (0.25 + 0.15 * math.cos(i / 7.0 + n)),
            )


def instance_from_reply(reply: dict[str, object], states: tuple[ShardState, ...]) -> InstanceState:
    """What the projector would write for a placement reply, with the given stage states."""
    stages_raw: Any = reply["stages"]
    assert isinstance(stages_raw, list)
    listed = cast("list[dict[str, Any]]", stages_raw)
    stages = tuple(
        StageState(
            stage=i,
            node=str(st["node"]),
            device=str(st["device"]),
            layer_start=int(st["layer_start"]),
            layer_end=int(st["layer_end"]),
            state=states[i % len(states)],
        )
        for i, st in enumerate(listed)
    )
    return InstanceState(
        instance_id=str(reply["instance_id"]),
        model=str(reply["model"]),
        generation=int(reply["generation"]),  # type: ignore[arg-type]
        stage_count=len(stages),
        stages=stages,
        state="loading",
        updated=time.time(),
    )
