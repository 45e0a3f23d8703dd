"""``--cpu-device``: the host's RAM and memory bandwidth as one more device, so a CPU-only node
(or a GPU node's spare RAM) can take layers. It takes the index after the node's GPUs."""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

from shardplane.agents.backend import Backend
from shardplane.bus.messages import DeviceSample

log = logging.getLogger(__name__)

BANDWIDTH_ENV = "SHARDPLANE_CPU_BANDWIDTH_GBPS"


def measure_copy_bandwidth_gbps(size_bytes: int = 64 * 1024**2, repeats: int = 3) -> float:
    """A quick memcpy figure (bytes read + bytes written per second, best of a few copies).
    Far from STREAM-exact, but the right order of magnitude, which is what the planner needs;
    SHARDPLANE_CPU_BANDWIDTH_GBPS overrides it with a measured figure."""
    import numpy as np

    src = np.ones(size_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return round(2 * size_bytes / best / 1e9, 1)


def cpu_bandwidth_gbps() -> float:
    if text := os.environ.get(BANDWIDTH_ENV):
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if value > 0:
            return value
        log.warning(
            "%s=%r is not a positive number of GB/s; measuring instead", BANDWIDTH_ENV, text
        )
    return measure_copy_bandwidth_gbps()


def host_sample(
    node: str,
    index: int,
    ts: float,
    threads: int | None,
    total: int,
    used: int,
    busy_pct: float,
    bandwidth_gbps: float,
) -> DeviceSample:
    """Host RAM as a device: what the real and the simulated host report alike."""
    vendor: Literal["cpu"] = "cpu"
    return DeviceSample(
        node=node,
        index=index,
        uuid=f"CPU-{node}",
        seq=0,
        ts=ts,
        vendor=vendor,
        name=f"CPU ({threads} threads)",
        memory_total_bytes=total,
        memory_used_bytes=used,
        memory_free_bytes=total - used,
        utilization_gpu_pct=busy_pct,
        bandwidth_gbps=bandwidth_gbps,
    )


class HostCpuDevice:
    """Reads the real host: total and available RAM (psutil), CPU utilisation."""

    def __init__(self, node: str, bandwidth_gbps: float | None = None) -> None:
        import psutil

        self._psutil = psutil
        self.node = node
        self.bandwidth_gbps = bandwidth_gbps if bandwidth_gbps is not None else cpu_bandwidth_gbps()
        self.held_bytes = 0
        psutil.cpu_percent(None)  # primes the counter; the first call always says 0

    def sample(self, index: int, ts: float) -> DeviceSample:
        vm = self._psutil.virtual_memory()
        total = int(vm.total)
        used = min(total, int(vm.total - vm.available) + self.held_bytes)
        busy = min(100.0, float(self._psutil.cpu_percent(None)))
        return host_sample(
            self.node, index, ts, os.cpu_count(), total, used, busy, self.bandwidth_gbps
        )


class SimCpuDevice:
    """A simulated node's host RAM: steady use by the OS and page cache, plus held shards."""

    def __init__(self, node: str, total_bytes: int, bandwidth_gbps: float, cpu_count: int) -> None:
        self.node = node
        self.total = total_bytes
        self.bandwidth_gbps = bandwidth_gbps
        self.cpu_count = cpu_count
        self.held_bytes = 0

    def sample(self, index: int, ts: float) -> DeviceSample:
        used = min(self.total, int(0.12 * self.total) + self.held_bytes)
        return host_sample(
            self.node, index, ts, self.cpu_count, self.total, used, 10.0, self.bandwidth_gbps
        )


class WithCpuDevice:
    """A backend plus the host as one more device at the index after the GPUs."""

    def __init__(self, inner: Backend, cpu: HostCpuDevice | SimCpuDevice) -> None:
        self.inner = inner
        self.cpu = cpu
        self.name = inner.name
        self.cpu_index = inner.device_count()

    @property
    def interconnect(self) -> str | None:
        return self.inner.interconnect

    def device_count(self) -> int:
        return self.cpu_index + 1

    def silenced(self) -> bool:
        silenced = getattr(self.inner, "silenced", None)
        return bool(silenced()) if callable(silenced) else False

    def read(
        self, ts: float, *, temperature: bool = True, power: bool = True
    ) -> list[DeviceSample]:
        out = self.inner.read(ts, temperature=temperature, power=power)
        out.append(self.cpu.sample(self.cpu_index, ts))
        return out

    def hold(self, index: int, delta_bytes: int) -> None:
        if index == self.cpu_index:
            self.cpu.held_bytes = max(0, self.cpu.held_bytes + delta_bytes)
        else:
            self.inner.hold(index, delta_bytes)

    def close(self) -> None:
        self.inner.close()
