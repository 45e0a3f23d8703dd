"""The fleet as the planner sees it: candidate devices with effective bandwidth and usable memory,
the links between them, and the devices left out with the reason why.

Pure: built from ``DeviceState``/``NodeState`` values (the projector's KV), no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from shardplane.bus.gpus import gpu_spec
from shardplane.bus.messages import DeviceState, NodeState
from shardplane.planner.plausible import implausible

# Link figures used when telemetry says nothing (documented in the README's cost model).
DEFAULT_NET_GBPS = 10.0  # Gbit/s between nodes (10 GbE)
DEFAULT_NET_LATENCY_MS = 0.2
PCIE_GBYTES = 16.0  # GB/s device-to-device through the host (PCIe 4.0 x16, practical)
PCIE_LATENCY_MS = 0.01
NVLINK_GBYTES = 100.0  # GB/s over NVLink / Infinity Fabric when the link reports none
NVLINK_LATENCY_MS = 0.005

HOT_C = 90.0  # at or above this temperature a device is left out (throttling imminent)
THERMAL_REASONS = ("thermal", "hw_slowdown", "hot")  # throttle reason substrings meaning heat
POWER_REASONS = ("power", "sw_power_cap", "hw_power_brake")
UTIL_FLOOR = 0.1  # a busy device still gives our shard at least 10% of its bandwidth


@dataclass(frozen=True, slots=True)
class Device:
    """A candidate device. ``bandwidth_gbps`` is effective (derated) GB/s; ``total_bytes`` and
    ``free_bytes`` as reported; ``promised_bytes`` is what the ledger promised to other instances
    and is not yet visible in ``free_bytes``."""

    ref: str  # "<node>/<index>"
    node: str
    index: int
    gpu: str
    bandwidth_gbps: float
    total_bytes: int
    free_bytes: int
    peak_gbps: float = 0.0
    uuid: str = ""
    pci_bus_id: str = ""
    nvlink_peers: frozenset[str] = frozenset()  # peer uuids or PCI bus ids
    promised_bytes: int = 0
    tflops: float = 0.0  # effective dense fp16/bf16 TFLOPS, derated like the bandwidth; 0: unknown
    calibrated: bool = False  # bandwidth_gbps is what the device measured running stages

    def usable_bytes(self, headroom: float) -> int:
        """Memory a new stage may take: free, less what the ledger promised and not yet loaded,
        less ``headroom`` x total (the request's safety margin). A negative promise (memory the
        instance being re-placed holds now) adds back, up to the device's total."""
        free = min(self.total_bytes, self.free_bytes - self.promised_bytes)
        return int(free - headroom * self.total_bytes)

    def signature(self, headroom: float) -> tuple[str, float, int, float]:
        """Devices with equal signatures are interchangeable (symmetry breaking, fast path)."""
        return (
            self.gpu,
            round(self.bandwidth_gbps, 3),
            self.usable_bytes(headroom),
            round(self.tflops, 3),
        )


@dataclass(frozen=True, slots=True)
class Link:
    gbytes_per_s: float
    latency_ms: float

    def hop_ms(self, nbytes: int) -> float:
        return nbytes / (self.gbytes_per_s * 1e9) * 1e3 + self.latency_ms


DEFAULT_LINK = Link(DEFAULT_NET_GBPS / 8.0, DEFAULT_NET_LATENCY_MS)  # no link announced


@dataclass(frozen=True, slots=True)
class Fleet:
    devices: tuple[Device, ...]  # grouped by node, nodes and indexes in order
    excluded: tuple[tuple[str, str], ...] = ()  # (device, reason)
    node_links: Mapping[tuple[str, str], Link] = field(default_factory=dict[tuple[str, str], Link])
    default_link: Link = DEFAULT_LINK

    def link(self, a: Device, b: Device) -> Link:
        """The path from device ``a`` to device ``b`` (the hop between consecutive stages)."""
        if a.node == b.node:
            if (
                (b.uuid and b.uuid in a.nvlink_peers)
                or (b.pci_bus_id and b.pci_bus_id in a.nvlink_peers)
                or (a.uuid and a.uuid in b.nvlink_peers)
                or (a.pci_bus_id and a.pci_bus_id in b.nvlink_peers)
            ):
                return Link(NVLINK_GBYTES, NVLINK_LATENCY_MS)
            return Link(PCIE_GBYTES, PCIE_LATENCY_MS)
        return (
            self.node_links.get((a.node, b.node))
            or self.node_links.get((b.node, a.node))
            or self.default_link
        )

    @property
    def nodes(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for d in self.devices:
            seen.setdefault(d.node, None)
        return tuple(seen)


def peak_bandwidth(state: DeviceState) -> tuple[float | None, str]:
    """Peak memory bandwidth in GB/s and where it came from: the agent's figure, else NVML's
    bus width x max memory clock x 2 (DDR) / 8, else the known-GPU table."""
    s = state.sample
    if s.bandwidth_gbps:
        return s.bandwidth_gbps, "telemetry"
    if s.memory_bus_width_bits and s.memory_clock_max_mhz:
        return (
            s.memory_bus_width_bits * s.memory_clock_max_mhz * 2 / 8 / 1000.0,
            "bus width x clock",
        )
    if s.name and (spec := gpu_spec(s.name)):
        return spec.bandwidth_gbps, "known-GPU table"
    return None, "unknown"


def peak_tflops(state: DeviceState) -> float:
    """Dense fp16/bf16 TFLOPS: the agent's figure, else the known-GPU table, else 0 (unknown:
    the compute term is left out for this device)."""
    s = state.sample
    if s.tflops:
        return s.tflops
    spec = gpu_spec(s.name) if s.name else None
    return spec.tflops if spec else 0.0


def _derate(state: DeviceState, peak: float, own: bool = False) -> float:
    """Effective figure (bandwidth or TFLOPS): the share of the device left by its current
    utilisation (floored at
    UTIL_FLOOR) times the clock ratio when the driver reports power throttling. ``own``: the
    instance being re-placed runs on this device, so the utilisation is (at least partly) its
    own work, which it would not compete with; counting it would make every serving instance
    look slow on its own devices and move off them for nothing."""
    s = state.sample
    factor = 1.0
    if s.utilization_gpu_pct is not None and not own:
        factor = max(UTIL_FLOOR, 1.0 - s.utilization_gpu_pct / 100.0)
    if not s.throttle_reasons:  # the common case, 16,000 times a request at 8,000 GPUs
        return peak * factor
    reasons = " ".join(s.throttle_reasons).lower()
    if any(r in reasons for r in POWER_REASONS) and s.sm_clock_mhz and s.sm_clock_max_mhz:
        factor *= min(1.0, max(UTIL_FLOOR, s.sm_clock_mhz / s.sm_clock_max_mhz))
    return peak * factor


def _exclusion(
    state: DeviceState, node: NodeState | None, excluded_nodes: frozenset[str]
) -> str | None:
    s = state.sample
    if s.node in excluded_nodes:
        return "node excluded by the request (exclude_nodes)"
    if not s.present:
        return f"device lost ({state.offline_reason or 'not present'})"
    if not state.online:
        return f"offline ({state.offline_reason or 'silent'})"
    if node is not None and not node.online:
        return f"node {s.node} offline ({node.offline_reason or 'no heartbeat'})"
    reasons = " ".join(s.throttle_reasons).lower() if s.throttle_reasons else ""
    if reasons and any(r in reasons for r in THERMAL_REASONS):
        temp = f" at {s.temperature_c:.0f} C" if s.temperature_c is not None else ""
        return f"thermal throttling ({', '.join(s.throttle_reasons)}){temp}"
    if s.temperature_c is not None and s.temperature_c >= HOT_C:
        return f"too hot: {s.temperature_c:.0f} C >= {HOT_C:.0f} C"
    if s.memory_total_bytes is None and s.memory_free_bytes is None:
        return "no memory figures reported"
    if (doubt := implausible(s)) is not None:
        return f"implausible telemetry, not trusted: {doubt}"
    return None


def _free_bytes(state: DeviceState) -> tuple[int, int]:
    s = state.sample
    total = s.memory_total_bytes
    free = s.memory_free_bytes
    if free is None and total is not None and s.memory_used_bytes is not None:
        free = max(0, total - s.memory_used_bytes)
    if free is None:
        free = total or 0
    return int(total if total is not None else free), int(free)


def build_fleet(
    devices: Iterable[DeviceState],
    nodes: Mapping[str, NodeState],
    *,
    exclude_nodes: Iterable[str] = (),
    promised: Mapping[str, int] | None = None,
    own: frozenset[str] = frozenset(),
) -> Fleet:
    """Candidates and exclusions from the KV's state. ``promised`` maps device ref -> bytes the
    ledger promised to other instances that the device's telemetry does not show yet; ``own``
    are the devices the instance being re-placed occupies (see ``_derate``)."""
    excluded_nodes = frozenset(exclude_nodes)
    promised = promised or {}
    kept: list[Device] = []
    excluded: list[tuple[str, str]] = []
    for state in sorted(devices, key=lambda d: (d.sample.node, d.sample.index)):
        s = state.sample
        ref = f"{s.node}/{s.index}"
        why = _exclusion(state, nodes.get(s.node), excluded_nodes)
        peak, _source = peak_bandwidth(state)
        if why is None and peak is None:
            why = f"memory bandwidth unknown for GPU {s.name or '?'!r} (no telemetry figure, not in the known-GPU table)"
        if why is not None or peak is None:
            excluded.append((ref, why or "unknown"))
            continue
        total, free = _free_bytes(state)
        peers = frozenset(
            p for link in s.nvlinks for p in (link.peer_uuid, link.peer_pci_bus_id) if p
        )
        kept.append(
            Device(
                ref=ref,
                node=s.node,
                index=s.index,
                gpu=s.name or s.vendor,
                # A device that has run stages is planned at the bandwidth it achieved
                # (projector.calibration), not at its datasheet figure.
                bandwidth_gbps=state.measured_gbps or _derate(state, peak, ref in own),
                calibrated=state.measured_gbps is not None or state.measured_tflops is not None,
                peak_gbps=peak,
                total_bytes=total,
                free_bytes=free,
                uuid=s.uuid,
                pci_bus_id=s.pci_bus_id or "",
                nvlink_peers=peers,
                promised_bytes=int(promised.get(ref, 0)),
                # Likewise the compute it achieved in multi-sequence steps, when measured.
                tflops=state.measured_tflops or _derate(state, peak_tflops(state), ref in own),
            )
        )
    links: dict[tuple[str, str], Link] = {}
    for name, node in nodes.items():
        for link in node.heartbeat.links:
            if link.gbps > 0:
                links[(name, link.peer)] = Link(link.gbps / 8.0, link.latency_ms)
    return Fleet(devices=tuple(kept), excluded=tuple(excluded), node_links=_measured(nodes, links))


def _measured(
    nodes: Mapping[str, NodeState], links: dict[tuple[str, str], Link]
) -> dict[tuple[str, str], Link]:
    """``links`` with each crossing the stages measured (projector.calibration) as its link's
    latency, at the bandwidth the link has otherwise. A measured crossing includes what the
    software pays (NATS, framing, waking the processes) and the transfer of one hidden state,
    which at batch 1 is microseconds on any network the planner knows."""
    for name, node in nodes.items():
        for peer, ms in node.measured_hop_ms.items():
            base = links.get((name, peer)) or links.get((peer, name)) or DEFAULT_LINK
            links[(name, peer)] = Link(base.gbytes_per_s, ms)
    return links
