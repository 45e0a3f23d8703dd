"""Fleets for planner tests: DeviceState/NodeState values as the projector would write them, and
helpers to put them into the real ``cluster_state`` bucket (standing in for the projector)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from nats.js import JetStreamContext

from bus import codec, subjects
from bus.gpus import GIB, gpu_spec
from bus.messages import DeviceSample, DeviceState, NetLink, NodeHeartbeat, NodeState, NvLink
from bus.streams import CLUSTER_STATE
from planner.fleet import Fleet, build_fleet


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpus: Sequence[str]  # known-GPU keys, one per device
    used_gib: float = 0.0  # already used on every device
    util_pct: float = 0.0
    nvlink: bool = False
    links: Sequence[tuple[str, float, float]] = ()  # (peer, Gbit/s, latency ms)


def device_state(
    node: str,
    index: int,
    gpu: str,
    *,
    used_gib: float = 0.0,
    util_pct: float = 0.0,
    online: bool = True,
    peers: Sequence[str] = (),
    temperature_c: float = 55.0,
    throttle: tuple[str, ...] = (),
) -> DeviceState:
    spec = gpu_spec(gpu)
    assert spec is not None, gpu
    used = int(used_gib * GIB)
    sample = DeviceSample(
        node=node,
        index=index,
        uuid=f"GPU-{node}-{index}",
        seq=1,
        ts=time.time(),
        vendor="sim",
        name=spec.name,
        memory_total_bytes=spec.memory_bytes,
        memory_used_bytes=used,
        memory_free_bytes=spec.memory_bytes - used,
        utilization_gpu_pct=util_pct,
        temperature_c=temperature_c,
        bandwidth_gbps=spec.bandwidth_gbps,
        tflops=spec.tflops,
        throttle_reasons=throttle,
        nvlinks=tuple(NvLink(link=i, peer_uuid=p) for i, p in enumerate(peers)),
    )
    return DeviceState(
        sample=sample,
        online=online,
        last_seen=time.time(),
        offline_reason=None if online else "no sample for 10 s",
    )


def node_state(spec: NodeSpec) -> NodeState:
    hb = NodeHeartbeat(
        node=spec.name,
        seq=1,
        ts=time.time(),
        device_count=len(spec.gpus),
        links=tuple(NetLink(peer=p, gbps=g, latency_ms=lat) for p, g, lat in spec.links),
        interconnect="nvlink" if spec.nvlink else "pcie",
    )
    return NodeState(heartbeat=hb, online=True, last_seen=time.time())


def states(nodes: Sequence[NodeSpec]) -> tuple[list[DeviceState], dict[str, NodeState]]:
    devices: list[DeviceState] = []
    for n in nodes:
        for i, gpu in enumerate(n.gpus):
            peers = [f"GPU-{n.name}-{j}" for j in range(len(n.gpus)) if j != i] if n.nvlink else []
            devices.append(
                device_state(n.name, i, gpu, used_gib=n.used_gib, util_pct=n.util_pct, peers=peers)
            )
    return devices, {n.name: node_state(n) for n in nodes}


def fleet_of(nodes: Sequence[NodeSpec], **kwargs: object) -> Fleet:
    devices, node_states = states(nodes)
    return build_fleet(devices, node_states, **kwargs)  # type: ignore[arg-type]


# The demo fleet (fleets/demo.toml): a mixed shop.
DEMO = (
    NodeSpec("rig-a", ["A100-80GB"], links=[("rig-d", 100.0, 0.01), ("rig-b", 25.0, 0.05)]),
    NodeSpec("rig-b", ["RTX-4090", "RTX-4090"]),
    NodeSpec("rig-c", ["RTX-3060-12GB", "P40"]),
    NodeSpec("rig-d", ["MI250X", "MI250X"], nvlink=True),
)


async def publish_fleet(js: JetStreamContext, nodes: Sequence[NodeSpec]) -> None:
    """Write the fleet into cluster_state as the projector would."""
    kv = await js.key_value(CLUSTER_STATE)
    devices, node_states = states(nodes)
    for d in devices:
        await kv.put(subjects.device_key(d.sample.node, d.sample.index), codec.encode(d))
    for name, n in node_states.items():
        await kv.put(subjects.node_key(name), codec.encode(n))


async def put_device(js: JetStreamContext, state: DeviceState) -> None:
    kv = await js.key_value(CLUSTER_STATE)
    await kv.put(subjects.device_key(state.sample.node, state.sample.index), codec.encode(state))
