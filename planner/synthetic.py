"""Synthetic fleets for benchmarks and scale tests: ``DeviceState``/``NodeState`` values shaped
like the projector's, built from the known-GPU table (no agents needed)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from shardplane.bus.gpus import GIB, gpu_spec
from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    NetLink,
    NodeHeartbeat,
    NodeState,
    NvLink,
)


@dataclass(frozen=True, slots=True)
class HostSpec:
    name: str
    gpus: tuple[str, ...]  # known-GPU keys
    nvlink: bool = False
    used_gib: float = 0.0
    util_pct: float = 0.0
    links: tuple[tuple[str, float, float], ...] = ()  # (peer, Gbit/s, latency ms)


def device_state(
    node: str,
    index: int,
    gpu: str,
    *,
    used_gib: float = 0.0,
    util_pct: float = 0.0,
    peers: Sequence[str] = (),
    online: bool = True,
    temperature_c: float = 55.0,
    throttle: tuple[str, ...] = (),
    ts: float | None = None,
) -> DeviceState:
    spec = gpu_spec(gpu)
    if spec is None:
        raise ValueError(f"unknown GPU {gpu!r}")
    now = time.time() if ts is None else ts
    used = min(spec.memory_bytes, int(used_gib * GIB))
    sample = DeviceSample(
        node=node,
        index=index,
        uuid=f"GPU-{node}-{index}",
        seq=1,
        ts=now,
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
        last_seen=now,
        offline_reason=None if online else "no sample within the TTL",
    )


def node_state(host: HostSpec, ts: float | None = None) -> NodeState:
    now = time.time() if ts is None else ts
    hb = NodeHeartbeat(
        node=host.name,
        seq=1,
        ts=now,
        device_count=len(host.gpus),
        links=tuple(NetLink(peer=p, gbps=g, latency_ms=lat) for p, g, lat in host.links),
        interconnect="nvlink" if host.nvlink else "pcie",
    )
    return NodeState(heartbeat=hb, online=True, last_seen=now)


def states(hosts: Sequence[HostSpec]) -> tuple[list[DeviceState], dict[str, NodeState]]:
    devices: list[DeviceState] = []
    for h in hosts:
        for i, gpu in enumerate(h.gpus):
            peers = [f"GPU-{h.name}-{j}" for j in range(len(h.gpus)) if j != i] if h.nvlink else []
            devices.append(
                device_state(h.name, i, gpu, used_gib=h.used_gib, util_pct=h.util_pct, peers=peers)
            )
    return devices, {h.name: node_state(h) for h in hosts}


def draw_hosts(
    rng: random.Random,
    devices: int,
    gpus: Sequence[str],
    *,
    per_host: tuple[int, int] = (1, 4),
    prefix: str = "n",
    used_gib: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
) -> list[HostSpec]:
    """``devices`` GPUs drawn with ``rng`` onto hosts of ``per_host`` GPUs each (one model per
    host, as real boxes are), each host NVLinked or not and with some memory already in use."""
    hosts: list[HostSpec] = []
    left = devices
    while left > 0:
        k = min(left, rng.randint(*per_host))
        gpu = rng.choice(list(gpus))
        nvlink = k > 1 and rng.random() < 0.5
        hosts.append(
            HostSpec(f"{prefix}{len(hosts)}", (gpu,) * k, nvlink, used_gib=rng.choice(used_gib))
        )
        left -= k
    return hosts


def random_hosts(
    devices: int,
    *,
    seed: int,
    gpus: Sequence[str],
    per_host: tuple[int, int] = (1, 4),
    prefix: str = "n",
    fast_links: int = 0,
) -> list[HostSpec]:
    """``devices`` GPUs on hosts of ``per_host`` GPUs each (one model per host, as real boxes
    are), a few hosts linked by faster networks than the 10 GbE default."""
    rng = random.Random(seed)
    hosts = draw_hosts(rng, devices, gpus, per_host=per_host, prefix=prefix)
    if fast_links and len(hosts) > 1:
        out: list[HostSpec] = []
        for h in hosts:
            links = tuple(
                (peer.name, rng.choice((25.0, 100.0)), rng.choice((0.01, 0.05)))
                for peer in rng.sample(hosts, min(fast_links, len(hosts)))
                if peer.name != h.name
            )
            out.append(HostSpec(h.name, h.gpus, h.nvlink, h.used_gib, h.util_pct, links))
        hosts = out
    return hosts
