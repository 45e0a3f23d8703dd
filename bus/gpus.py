"""Known GPUs: datasheet memory, bandwidth and dense FP16/BF16 tensor TFLOPS.

Shared by the simulator (to produce realistic telemetry) and the planner (a bandwidth fallback
when a device reports none). Measured or NVML-derived figures always win over this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GB = 1000**3
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuSpec:
    key: str  # short name used in fleet files
    name: str  # what the driver reports
    vendor: str  # "nvidia" | "amd" | "apple" | "cpu"
    memory_bytes: int
    bandwidth_gbps: float
    tflops: float
    tdp_w: float
    memory_bus_width_bits: int
    memory_clock_max_mhz: float
    sm_clock_max_mhz: float
    aliases: tuple[str, ...] = ()
    # CUDA compute capability (NVIDIA's CUDA GPUs page; None: not NVIDIA). Engines gate on it:
    # vLLM needs 7.0 or newer, so a P40 (6.1) cannot join a vLLM deployment.
    compute_capability: tuple[int, int] | None = None


def _gib(n: float) -> int:
    return int(n * GIB)


KNOWN_GPUS: tuple[GpuSpec, ...] = (
    GpuSpec(
        "H100-SXM",
        "NVIDIA H100 80GB HBM3",
        "nvidia",
        _gib(80),
        3350.0,
        989.0,
        700.0,
        5120,
        2619.0,
        1980.0,
        ("h100",),
        compute_capability=(9, 0),
    ),
    GpuSpec(
        "H200",
        "NVIDIA H200",
        "nvidia",
        _gib(141),
        4800.0,
        989.0,
        700.0,
        6144,
        3201.0,
        1980.0,
        compute_capability=(9, 0),
    ),
    GpuSpec(
        "A100-40GB",
        "NVIDIA A100-SXM4-40GB",
        "nvidia",
        _gib(40),
        1555.0,
        312.0,
        400.0,
        5120,
        1215.0,
        1410.0,
        compute_capability=(8, 0),
    ),
    GpuSpec(
        "A100-80GB",
        "NVIDIA A100-SXM4-80GB",
        "nvidia",
        _gib(80),
        2039.0,
        312.0,
        400.0,
        5120,
        1593.0,
        1410.0,
        ("a100",),
        compute_capability=(8, 0),
    ),
    GpuSpec(
        "A100-80GB-PCIE",
        "NVIDIA A100 80GB PCIe",
        "nvidia",
        _gib(80),
        1935.0,
        312.0,
        300.0,
        5120,
        1512.0,
        1410.0,
        compute_capability=(8, 0),
    ),
    GpuSpec(
        "L40S",
        "NVIDIA L40S",
        "nvidia",
        _gib(48),
        864.0,
        362.0,
        350.0,
        384,
        9001.0,
        2520.0,
        compute_capability=(8, 9),
    ),
    GpuSpec(
        "A10",
        "NVIDIA A10",
        "nvidia",
        _gib(24),
        600.0,
        125.0,
        150.0,
        384,
        6251.0,
        1695.0,
        compute_capability=(8, 6),
    ),
    GpuSpec(
        "RTX-4090",
        "NVIDIA GeForce RTX 4090",
        "nvidia",
        _gib(24),
        1008.0,
        165.0,
        450.0,
        384,
        10501.0,
        2520.0,
        ("4090",),
        compute_capability=(8, 9),
    ),
    GpuSpec(
        "RTX-3090",
        "NVIDIA GeForce RTX 3090",
        "nvidia",
        _gib(24),
        936.0,
        71.0,
        350.0,
        384,
        9751.0,
        1695.0,
        ("3090",),
        compute_capability=(8, 6),
    ),
    GpuSpec(
        "RTX-3060-12GB",
        "NVIDIA GeForce RTX 3060",
        "nvidia",
        _gib(12),
        360.0,
        25.5,
        170.0,
        192,
        7501.0,
        1777.0,
        ("3060",),
        compute_capability=(8, 6),
    ),
    GpuSpec(
        "T4",
        "Tesla T4",
        "nvidia",
        _gib(16),
        320.0,
        65.0,
        70.0,
        256,
        5001.0,
        1590.0,
        compute_capability=(7, 5),
    ),
    GpuSpec(
        "V100-32GB",
        "Tesla V100-SXM2-32GB",
        "nvidia",
        _gib(32),
        900.0,
        125.0,
        300.0,
        4096,
        877.0,
        1530.0,
        ("v100",),
        compute_capability=(7, 0),
    ),
    GpuSpec(
        "P40",
        "Tesla P40",
        "nvidia",
        _gib(24),
        346.0,
        0.18,
        250.0,
        384,
        3615.0,
        1531.0,
        compute_capability=(6, 1),
    ),
    # An MI250X package shows up as two 64 GB devices (GCDs) of 1.6 TB/s each.
    GpuSpec(
        "MI250X",
        "AMD Instinct MI250X",
        "amd",
        _gib(64),
        1600.0,
        191.5,
        280.0,
        4096,
        1600.0,
        1700.0,
        ("mi250", "mi250x"),
    ),
    GpuSpec(
        "MI300X",
        "AMD Instinct MI300X",
        "amd",
        _gib(192),
        5300.0,
        1307.0,
        750.0,
        8192,
        2600.0,
        2100.0,
    ),
)

_BY_KEY = {spec.key.lower(): spec for spec in KNOWN_GPUS}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def gpu_spec(name: str) -> GpuSpec | None:
    """Look a GPU up by fleet key, alias or driver name ("NVIDIA GeForce RTX 4090" -> RTX-4090)."""
    if spec := _BY_KEY.get(name.lower()):
        return spec
    wanted = _norm(name)
    for spec in KNOWN_GPUS:
        if wanted in (_norm(spec.key), _norm(spec.name), *(_norm(a) for a in spec.aliases)):
            return spec
    # Driver names carry vendor prefixes and suffixes; match the longest key contained in it.
    best: GpuSpec | None = None
    for spec in KNOWN_GPUS:
        for token in (spec.key, spec.name, *spec.aliases):
            t = _norm(token)
            if len(t) >= 3 and t in wanted and (best is None or len(t) > len(_norm(best.key))):
                best = spec
    return best


def compute_capability(name: str) -> tuple[int, int] | None:
    """The CUDA compute capability of a known NVIDIA GPU, by any name :func:`gpu_spec` takes."""
    spec = gpu_spec(name)
    return spec.compute_capability if spec else None
