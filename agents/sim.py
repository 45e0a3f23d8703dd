"""The simulated GPU backend: realistic, drifting telemetry for the nodes of a fleet file, with
fault injection on a schedule (the fleet file's [[faults]]) or by command (``SimNode.inject``,
or the ``sim.fault.<node>`` NATS request served by ``agents.service``).

Time is simulated: each ``read`` advances a node's clock by one interval, so a seed gives the
same values in the same order however busy the machine is (wall-clock jitter never leaks in).
Each device has its own random stream, so a fault on one device never changes another's values.
The physics are small pure functions; the per-device state is a slotted mutable object because
a scale run steps thousands of them every interval.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from typing import Any, Literal

import msgspec

from shardplane.agents.fleet import NODE_FAULTS, FaultKind, Fleet, SimGpu, SimNodeSpec
from shardplane.bus.gpus import GpuSpec
from shardplane.bus.messages import DeviceSample, NvLink

log = logging.getLogger(__name__)

AMBIENT_C = 28.0
THERMAL_TAU_S = 15.0  # how fast the die temperature follows its power draw
UTIL_THETA = 0.15  # per second: pull of utilisation towards its current phase mean
UTIL_SIGMA = 6.0  # % per sqrt(second)
PHASE_MEAN_S = 45.0  # mean time between workload phase changes
MIB = 1024**2

# NVLink / Infinity Fabric GB/s per device pair and direction, when the fleet does not say.
_PAIR_GBPS: dict[str, float] = {
    "H100-SXM": 450.0,
    "H200": 450.0,
    "A100-40GB": 300.0,
    "A100-80GB": 300.0,
    "A100-80GB-PCIE": 300.0,
    "V100-32GB": 150.0,
    "MI250X": 200.0,
    "MI300X": 64.0,
    "RTX-3090": 56.0,
}
_PCIE_GEN: dict[str, int] = {"H100-SXM": 5, "H200": 5, "MI300X": 5, "RTX-4090": 4, "L40S": 4}
_OLD_PCIE = {"P40", "V100-32GB"}
# Datacenter parts report ECC; consumer parts do not have it.
# High-bandwidth-memory parts have a memory temperature sensor (DCGM_FI_DEV_MEMORY_TEMP).
_HBM = {
    "H100-SXM",
    "H200",
    "A100-40GB",
    "A100-80GB",
    "A100-80GB-PCIE",
    "V100-32GB",
    "MI250X",
    "MI300X",
}
# Row remapping (instead of page retirement) arrived with Ampere's datacenter parts.
_ROW_REMAP = {"H100-SXM", "H200", "A100-40GB", "A100-80GB", "A100-80GB-PCIE", "A10"}
# What a simulated agent reports as its driver: the vendor's, in the vendor's format.
SIM_DRIVER = {"nvidia": "550.54.15", "amd": "6.8.5"}
# Every high-bandwidth-memory part reports ECC, and so do these GDDR datacenter parts.
_ECC = _HBM | {"A10", "T4", "L40S", "P40"}


def stable_seed(*parts: object) -> int:
    """A seed from text that is the same in every process (``hash()`` is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def sim_uuid(seed: int, node: str, index: int, vendor: str) -> str:
    h = hashlib.blake2b(f"{seed}/{node}/{index}".encode(), digest_size=16).hexdigest()
    prefix = "GPU" if vendor == "nvidia" else "AMD"
    return f"{prefix}-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def sim_pci_bus_id(index: int) -> str:
    return f"00000000:{(0x18 + index * 0x10) & 0xFF:02X}:00.0"


# --- the physics: pure functions --------------------------------------------------------------


def power_draw_w(util_pct: float, tdp_w: float, throttled: bool, jitter: float) -> float:
    """Idle is about a tenth of TDP; draw rises slightly sub-linearly with utilisation; a
    throttled part is capped near half its TDP."""
    idle = 0.1 * tdp_w
    draw = idle + (tdp_w - idle) * (max(util_pct, 0.0) / 100.0) ** 0.85 * jitter
    cap = 0.55 * tdp_w if throttled else tdp_w
    return round(min(draw, cap), 1)


def temperature_target_c(power_w: float, tdp_w: float, throttled: bool) -> float:
    """Full power settles near 80 C; a throttle fault models a failing fan (+18 C)."""
    return AMBIENT_C + 52.0 * power_w / tdp_w + (18.0 if throttled else 0.0)


def follow(current: float, target: float, dt: float, tau: float) -> float:
    """First-order lag: how a temperature approaches its target."""
    return target + (current - target) * math.exp(-dt / tau)


def sm_clock_mhz(util_pct: float, max_mhz: float, throttled: bool, hot: bool) -> float:
    clock = max_mhz * (0.3 + 0.7 * min(1.0, util_pct / 40.0))
    if throttled:
        clock *= 0.55
    if hot:
        clock *= 0.8
    return round(clock, 0)


def throttle_reasons(
    util_pct: float, throttled: bool, hot: bool, power_capped: bool
) -> tuple[str, ...]:
    reasons: list[str] = []
    if util_pct < 2.0:
        reasons.append("gpu_idle")
    if power_capped:
        reasons.append("sw_power_cap")
    if throttled:
        reasons += ["hw_slowdown", "hw_thermal_slowdown"]
    if hot:
        reasons.append("sw_thermal_slowdown")
    return tuple(reasons)


def nvlinks_for(
    index: int,
    pairs: tuple[tuple[int, int], ...],
    uuids: list[str],
    gbps: float | None,
) -> tuple[NvLink, ...]:
    links: list[NvLink] = []
    for a, b in pairs:
        if index in (a, b):
            peer = b if a == index else a
            links.append(
                NvLink(
                    link=len(links),
                    peer_pci_bus_id=sim_pci_bus_id(peer),
                    peer_uuid=uuids[peer],
                    gbps=gbps,
                )
            )
    return tuple(links)


# --- state ------------------------------------------------------------------------------------


class SimDevice:
    __slots__ = (
        "base_bytes",
        "energy_mj",
        "fill_fraction",
        "held_bytes",
        "index",
        "mem_frac",
        "mem_mu",
        "nvlinks",
        "pci",
        "present",
        "rng",
        "spec",
        "temp",
        "throttled",
        "util",
        "util_mu",
        "uuid",
    )

    def __init__(self, gpu: SimGpu, uuid: str, seed: int, load: float) -> None:
        self.index = gpu.index
        self.spec: GpuSpec = gpu.spec
        self.uuid = uuid
        self.pci = sim_pci_bus_id(gpu.index)
        self.rng = random.Random(seed)
        self.util_mu = 100.0 * load
        self.util = max(0.0, min(100.0, self.rng.gauss(self.util_mu, 10.0)))
        # Driver context and allocator slack: a few hundred MiB on any busy GPU.
        self.base_bytes = int(256 * MIB + 0.005 * gpu.spec.memory_bytes)
        self.mem_mu = 0.04 + 0.2 * load
        self.mem_frac = self.mem_mu
        self.temp = AMBIENT_C + 10.0 + self.rng.uniform(0.0, 6.0)
        self.held_bytes = 0
        self.fill_fraction: float | None = None
        self.present = True
        self.throttled = False
        self.nvlinks: tuple[NvLink, ...] = ()
        self.energy_mj = 0.0  # since the simulated driver loaded

    def step(self, dt: float, load: float) -> None:
        rng = self.rng
        if rng.random() < dt / PHASE_MEAN_S:
            # A new workload phase: an idle spell, a busy spell, or back to the usual mix.
            self.util_mu = min(98.0, max(1.0, 100.0 * load * rng.uniform(0.1, 2.2)))
            self.mem_mu = min(0.6, max(0.01, (0.04 + 0.2 * load) * rng.uniform(0.5, 1.8)))
        pull = min(1.0, UTIL_THETA * dt)
        self.util += pull * (self.util_mu - self.util) + UTIL_SIGMA * math.sqrt(dt) * rng.gauss(
            0.0, 1.0
        )
        self.util = min(100.0, max(0.0, self.util))
        self.mem_frac += min(1.0, 0.05 * dt) * (self.mem_mu - self.mem_frac) + 0.002 * math.sqrt(
            dt
        ) * rng.gauss(0.0, 1.0)
        self.mem_frac = min(0.95, max(0.0, self.mem_frac))

    def sample(
        self, node: str, ts: float, dt: float, temperature: bool, power: bool
    ) -> DeviceSample:
        spec = self.spec
        vendor: Literal["sim"] = "sim"
        if not self.present:
            return DeviceSample(
                node=node, index=self.index, uuid=self.uuid, seq=0, ts=ts, present=False,
                vendor=vendor, name=spec.name, pci_bus_id=self.pci,
            )  # fmt: skip
        total = spec.memory_bytes
        used = self.base_bytes + int(self.mem_frac * total) + self.held_bytes
        if self.fill_fraction is not None:
            used = max(used, int(self.fill_fraction * total))
        used = min(used, total)
        util = round(self.util, 1)
        jitter = 0.95 + 0.1 * self.rng.random()
        draw = power_draw_w(util, spec.tdp_w, self.throttled, jitter)
        self.temp = follow(
            self.temp, temperature_target_c(draw, spec.tdp_w, self.throttled), dt, THERMAL_TAU_S
        )
        hot = self.temp > 87.0
        capped = draw >= 0.98 * spec.tdp_w
        self.energy_mj += draw * dt * 1000.0  # counts even with power reporting off
        return DeviceSample(
            **self.counters(util, used),
            node=node,
            index=self.index,
            uuid=self.uuid,
            seq=0,
            ts=ts,
            vendor=vendor,
            name=spec.name,
            pci_bus_id=self.pci,
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_free_bytes=total - used,
            utilization_gpu_pct=util,
            utilization_memory_pct=round(min(100.0, util * 0.55), 1),
            temperature_c=round(self.temp, 1) if temperature else None,
            power_w=draw if power else None,
            power_limit_w=spec.tdp_w if power else None,
            sm_clock_mhz=sm_clock_mhz(util, spec.sm_clock_max_mhz, self.throttled, hot),
            sm_clock_max_mhz=spec.sm_clock_max_mhz,
            memory_clock_mhz=spec.memory_clock_max_mhz,
            memory_clock_max_mhz=spec.memory_clock_max_mhz,
            memory_bus_width_bits=spec.memory_bus_width_bits,
            bandwidth_gbps=spec.bandwidth_gbps,
            tflops=spec.tflops,
            throttle_reasons=throttle_reasons(util, self.throttled, hot, capped),
            ecc_uncorrected=0 if spec.key in _ECC else None,
            xid_errors=0 if spec.vendor == "nvidia" else None,
            nvlinks=self.nvlinks,
            pcie_gen=_PCIE_GEN.get(spec.key, 3 if spec.key in _OLD_PCIE else 4),
            pcie_width=16,
        )

    def counters(self, util: float, used: int) -> dict[str, Any]:
        """The DCGM default counters beyond the planner's figures, derived from the simulated
        load without drawing random numbers (so a seed's other values stay as they were)."""
        spec = self.spec
        remap = spec.key in _ROW_REMAP
        # A busy GPU streams activations and checkpoints over PCIe: tens of MB/s per % used.
        pcie = 20e6 * util
        return {
            "driver_version": SIM_DRIVER.get(spec.vendor),
            # The driver's context, which this simulation counts in "used" as NVML v1 does.
            "memory_reserved_bytes": min(256 * MIB, used),
            "memory_temperature_c": round(self.temp + 6.0, 1) if spec.key in _HBM else None,
            "energy_mj": int(self.energy_mj),
            "utilization_encoder_pct": 0.0,
            "utilization_decoder_pct": 0.0,
            "pcie_replay_count": 0,
            "pcie_tx_bytes_per_s": round(pcie, 1),
            "pcie_rx_bytes_per_s": round(pcie * 0.6, 1),
            "xid_last": 0 if spec.vendor == "nvidia" else None,
            "remapped_rows_correctable": 0 if remap else None,
            "remapped_rows_uncorrectable": 0 if remap else None,
            "row_remap_failed": False if remap else None,
        }


class Fault(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A fault by command (the body of a ``sim.fault.<node>`` request, JSON or MessagePack)."""

    kind: FaultKind
    device: int | None = None
    duration_s: float | None = None
    fraction: float = 0.98


_REVERT: dict[str, FaultKind] = {
    "vanish": "return",
    "throttle": "unthrottle",
    "fill": "drain",
    "silent": "resume",
}


class SimNode:
    """One simulated node: a Backend (see agents.backend) plus a fault injector."""

    name = "sim"

    def __init__(self, spec: SimNodeSpec, fleet: Fleet) -> None:
        self.spec = spec
        self.node = spec.name
        self.interval_s = fleet.interval_s
        self.clock_s = 0.0  # simulated seconds since start
        self._silent = False
        seed = fleet.seed
        uuids = [sim_uuid(seed, spec.name, g.index, g.spec.vendor) for g in spec.gpus]
        self.devices = [
            SimDevice(g, uuids[g.index], stable_seed(seed, spec.name, g.index), spec.load)
            for g in spec.gpus
        ]
        for dev in self.devices:
            gbps = spec.nvlink_gbps or _PAIR_GBPS.get(dev.spec.key, 50.0)
            dev.nvlinks = nvlinks_for(dev.index, spec.nvlink, uuids, gbps)
        # Pending faults on the simulated clock: (at_s, order, fault). Scheduled ones from the
        # fleet file, plus the reverts of faults that carry a duration.
        self._schedule: list[tuple[float, int, Fault]] = [
            (
                f.at_s,
                i,
                Fault(kind=f.kind, device=f.device, duration_s=f.duration_s, fraction=f.fraction),
            )
            for i, f in enumerate(x for x in fleet.faults if x.node == spec.name)
        ]
        self._order = len(self._schedule)
        self.applied: list[tuple[float, Fault]] = []  # what happened, when (for tests and logs)

    # Backend protocol
    @property
    def interconnect(self) -> str | None:
        return self.spec.interconnect

    def device_count(self) -> int:
        return len(self.devices)

    def silenced(self) -> bool:
        return self._silent

    def read(
        self, ts: float, *, temperature: bool = True, power: bool = True
    ) -> list[DeviceSample]:
        dt = self.interval_s
        self.clock_s += dt
        self._run_due()
        out: list[DeviceSample] = []
        for dev in self.devices:
            dev.step(dt, self.spec.load)
            out.append(dev.sample(self.node, ts, dt, temperature, power))
        return out

    def hold(self, index: int, delta_bytes: int) -> None:
        if not 0 <= index < len(self.devices):
            log.warning(
                "%s: hold of %d bytes on device %d, which does not exist",
                self.node,
                delta_bytes,
                index,
            )
            return
        dev = self.devices[index]
        dev.held_bytes = max(0, dev.held_bytes + delta_bytes)

    def close(self) -> None:
        return None

    # faults
    def inject(self, fault: Fault) -> None:
        """Apply ``fault`` now; with a duration, schedule its revert on the simulated clock."""
        if fault.kind not in NODE_FAULTS and (
            fault.device is None or not 0 <= fault.device < len(self.devices)
        ):
            raise ValueError(
                f"{self.node}: fault {fault.kind!r} needs a device in 0..{len(self.devices) - 1}, got {fault.device}"
            )
        self._apply(fault)
        revert = _REVERT.get(fault.kind)
        if fault.duration_s is not None and revert is not None:
            self._order += 1
            self._schedule.append(
                (
                    self.clock_s + fault.duration_s,
                    self._order,
                    Fault(kind=revert, device=fault.device),
                )
            )

    def _run_due(self) -> None:
        if not self._schedule:
            return
        due = sorted(e for e in self._schedule if e[0] <= self.clock_s + 1e-9)
        if not due:
            return
        self._schedule = [e for e in self._schedule if e[0] > self.clock_s + 1e-9]
        for _, _, fault in due:
            self.inject(fault)

    def _apply(self, fault: Fault) -> None:
        self.applied.append((self.clock_s, fault))
        log.info(
            "%s: fault %s%s at t=%.0fs",
            self.node,
            fault.kind,
            "" if fault.device is None else f" on device {fault.device}",
            self.clock_s,
        )
        if fault.kind == "silent":
            self._silent = True
            return
        if fault.kind == "resume":
            self._silent = False
            return
        assert fault.device is not None
        dev = self.devices[fault.device]
        if fault.kind == "vanish":
            dev.present = False
        elif fault.kind == "return":
            dev.present = True
        elif fault.kind == "throttle":
            dev.throttled = True
        elif fault.kind == "unthrottle":
            dev.throttled = False
        elif fault.kind == "fill":
            dev.fill_fraction = fault.fraction
        else:  # drain
            dev.fill_fraction = None


def sim_nodes(fleet: Fleet, only: str | None = None) -> list[SimNode]:
    nodes = [SimNode(spec, fleet) for spec in fleet.nodes if only is None or spec.name == only]
    if only is not None and not nodes:
        raise ValueError(
            f"node {only!r} is not in the fleet (it has {', '.join(n.name for n in fleet.nodes[:10])}...)"
        )
    return nodes
