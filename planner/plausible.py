"""Telemetry the planner refuses to trust: figures beyond any known GPU by a wide margin.

Why: the planner places gigabytes on a device because its telemetry says they fit. A device
that reports 10,000 GiB (a forged sample, a driver bug, a unit mix-up) would attract every
stage and every failure after. Roles stop forgeries on the bus; this stops whatever gets
through anyway. "A wide margin" is ``MARGIN`` times the largest figure in the known-GPU table,
so a new GPU a generation or two ahead is still trusted, and an unknown but plausible one is
placed on as usual. A ``cpu`` device (host RAM offered with ``--cpu-device``) is held to what a
host can have instead.
"""

from __future__ import annotations

from shardplane.bus.gpus import KNOWN_GPUS
from shardplane.bus.messages import DeviceSample

MARGIN = 4.0
GIB = 1024**3
MAX_MEMORY = int(MARGIN * max(g.memory_bytes for g in KNOWN_GPUS))
MAX_BANDWIDTH_GBPS = MARGIN * max(g.bandwidth_gbps for g in KNOWN_GPUS)
MAX_TFLOPS = MARGIN * max(g.tflops for g in KNOWN_GPUS)
MAX_HOST_MEMORY = 64 * 1024 * GIB  # 64 TiB: beyond the largest single hosts sold


def implausible(s: DeviceSample) -> str | None:
    """Why ``s`` cannot be trusted, naming the figure and the limit; None when plausible."""
    limit = MAX_HOST_MEMORY if s.vendor == "cpu" else MAX_MEMORY
    for name, value in (
        ("memory_total_bytes", s.memory_total_bytes),
        ("memory_free_bytes", s.memory_free_bytes),
        ("memory_used_bytes", s.memory_used_bytes),
    ):
        if value is not None and value > limit:
            return f"{name} {value / GIB:,.0f} GiB is over {limit / GIB:,.0f} GiB"
    total = s.memory_total_bytes
    for name, value in (
        ("memory_free_bytes", s.memory_free_bytes),
        ("memory_used_bytes", s.memory_used_bytes),
    ):
        if total is not None and value is not None and value > total:
            return (
                f"{name} {value / GIB:,.1f} GiB exceeds memory_total_bytes {total / GIB:,.1f} GiB"
            )
    if s.vendor != "cpu":
        if s.bandwidth_gbps is not None and s.bandwidth_gbps > MAX_BANDWIDTH_GBPS:
            return f"bandwidth {s.bandwidth_gbps:,.0f} GB/s is over {MAX_BANDWIDTH_GBPS:,.0f} GB/s"
        if s.tflops is not None and s.tflops > MAX_TFLOPS:
            return f"tflops {s.tflops:,.0f} is over {MAX_TFLOPS:,.0f}"
    return None
