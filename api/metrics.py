"""Prometheus text exposition, rendered from the cached cluster state.

GPU figures use the metric and label names of each vendor's own exporter, so dashboards built
for those work unchanged:

- NVIDIA devices: NVIDIA's dcgm-exporter. Every counter of its default set
  (``etc/default-counters.csv``) that NVML can fill is here (:data:`DCGM_FAMILIES`);
  :data:`DCGM_NOT_FILLED` names the rest and why. Labels in its order: ``gpu``, ``UUID``,
  ``pci_bus_id``, ``device``, ``modelName``, the host label, then ``DCGM_FI_DRIVER_VERSION``
  (a "label" counter of the default set: the exporter turns it into a label of every series).
- AMD devices: AMD's device-metrics-exporter (github.com/ROCm/device-metrics-exporter), whose
  names are lower case without a prefix (``gpu_gfx_activity``, ``gpu_used_vram``...) and whose
  labels are ``gpu_id``, ``gpu_uuid``, ``card_model``, ``hostname``, ``driver_version``
  (:data:`AMD_FAMILIES`). AMD GPUs never appear under ``DCGM_FI_*`` names.
- Simulated devices use their simulated part's vendor; others (the CPU device) have only
  shardplane's own series.

The host label. dcgm-exporter releases up to 4.5.3-4.8.2 spell it ``Hostname``; its main
branch renamed it to ``hostname`` (commit d5e5f51, May 2026: joins with other exporters'
``hostname`` broke on the case), which is what AMD's exporter and Prometheus' own conventions
use. shardplane writes ``hostname`` on every series, so one ``by (hostname)`` spans vendors;
``SHARDPLANE_METRICS_HOSTNAME_LABEL=Hostname`` restores the old spelling for dashboards written
against a released dcgm-exporter (:func:`host_label_from_env`). The value is the agent's
hostname from its heartbeat, else the node id.

shardplane's own ``shardplane_*`` families carry ``node``, ``device_id`` (as in the API) and
``instance_id`` (never ``instance``, which Prometheus renames to ``exported_instance`` when it
attaches its own target label), and use base units: seconds and bytes. A device that is offline
or lost keeps only ``shardplane_device_up`` (0): its last figures are not served as current.

Every family is one row of a table (:class:`Family`: name, help, type, how to read the value)
and one function renders any row, so adding a figure is adding a row. At 8,000 devices a scrape
holds about 170,000 lines (~40 MB, 2 MB gzipped): formatting them per request would cost far
too much, so each device's lines are formatted once after its KV entry changes
(:func:`device_lines`), kept per family in insertion order (:class:`LineBook`), and each
family's joined block is cached until one of its own lines changes (a clock that did not move
keeps its family's block).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from operator import attrgetter
from typing import Any, Generic, NamedTuple, TypeVar

import msgspec

from shardplane.api.views import DeviceBrief, View
from shardplane.bus.gpus import gpu_spec

MIB = 1024 * 1024
# How often the server renders the scrape text afresh while something scrapes and the state
# changed: a scrape's figures are at most this (plus one render) older than the cluster state.
RENDER_INTERVAL_S = 1.0
HOSTNAME_LABEL_ENV = "SHARDPLANE_METRICS_HOSTNAME_LABEL"
HOSTNAME_LABELS = ("hostname", "Hostname")

Value = int | float
Subject = TypeVar("Subject")


class Family(msgspec.Struct, Generic[Subject], frozen=True):
    """One metric family, and how to read its value from what a line is about (a device
    brief, a node or instance view, a pipeline stage); a value of None means no line, as the
    DCGM exporter leaves out a field the device does not report."""

    name: str
    help: str
    type: str
    value: Callable[[Subject], Value | None]


def _mib(value: int | None) -> int | None:
    # DCGM reports framebuffer figures in whole MiB; AMD's exporter VRAM in MB of 2^20 bytes.
    return None if value is None else int(value) // MIB


def _flag(value: bool | None) -> int | None:
    return None if value is None else int(value)


def _dcgm(
    name: str, help: str, kind: str, value: Callable[[DeviceBrief], Value | None]
) -> Family[Any]:
    return Family[DeviceBrief](name, help, kind, value)


# dcgm-exporter's default counters (etc/default-counters.csv), in its order and with its help
# texts and types, each filled from a DeviceSample field (see agents/nvml.py for the NVML call).
# Each device line costs ~240 bytes, so at 8,000 devices every family adds ~2 MB to a scrape.
DCGM_FAMILIES: tuple[Family[Any], ...] = (
    _dcgm(
        "DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "gauge", attrgetter("sm_clock_mhz")
    ),
    _dcgm(
        "DCGM_FI_DEV_MEM_CLOCK",
        "Memory clock frequency (in MHz).",
        "gauge",
        attrgetter("memory_clock_mhz"),
    ),
    _dcgm(
        "DCGM_FI_DEV_MEMORY_TEMP",
        "Memory temperature (in C).",
        "gauge",
        attrgetter("memory_temperature_c"),
    ),
    _dcgm("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "gauge", attrgetter("temperature_c")),
    _dcgm("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "gauge", attrgetter("power_w")),
    _dcgm(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        "counter",
        attrgetter("energy_mj"),
    ),
    _dcgm(
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "Total number of PCIe retries.",
        "counter",
        attrgetter("pcie_replay_count"),
    ),
    _dcgm(
        "DCGM_FI_DEV_GPU_UTIL",
        "GPU utilization (in %).",
        "gauge",
        attrgetter("utilization_gpu_pct"),
    ),
    _dcgm(
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "Memory utilization (in %).",
        "gauge",
        attrgetter("utilization_memory_pct"),
    ),
    _dcgm(
        "DCGM_FI_DEV_ENC_UTIL",
        "Encoder utilization (in %).",
        "gauge",
        attrgetter("utilization_encoder_pct"),
    ),
    _dcgm(
        "DCGM_FI_DEV_DEC_UTIL",
        "Decoder utilization (in %).",
        "gauge",
        attrgetter("utilization_decoder_pct"),
    ),
    _dcgm(
        "DCGM_FI_DEV_XID_ERRORS",
        "Value of the last XID error encountered.",
        "gauge",
        attrgetter("xid_last"),
    ),
    _dcgm(
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        "gauge",
        lambda d: _mib(d.memory_free_bytes),
    ),
    _dcgm(
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        "gauge",
        lambda d: _mib(d.memory_used_bytes),
    ),
    _dcgm(
        "DCGM_FI_DEV_FB_RESERVED",
        "Framebuffer memory reserved (in MiB).",
        "gauge",
        lambda d: _mib(d.memory_reserved_bytes),
    ),
    _dcgm(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for uncorrectable errors",
        "counter",
        attrgetter("remapped_rows_uncorrectable"),
    ),
    _dcgm(
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for correctable errors",
        "counter",
        attrgetter("remapped_rows_correctable"),
    ),
    _dcgm(
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "Whether remapping of rows has failed",
        "gauge",
        lambda d: _flag(d.row_remap_failed),
    ),
    _dcgm(
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and "
        "data payloads - in bytes per second.",
        "gauge",
        attrgetter("pcie_tx_bytes_per_s"),
    ),
    _dcgm(
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "The rate of data received over the PCIe bus - including both protocol headers and "
        "data payloads - in bytes per second.",
        "gauge",
        attrgetter("pcie_rx_bytes_per_s"),
    ),
)
# The default counters left out, and why: no NVML call gives the figure DCGM means.
DCGM_NOT_FILLED: dict[str, str] = {
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": "DCGM sums its own per-link counters, whose unit "
    "depends on the NVLink generation and counter configuration; NVML's NVLink throughput "
    "fields are a different figure",
    "DCGM_FI_DEV_VGPU_LICENSE_STATUS": "only inside a vGPU guest, where no shardplane agent "
    "runs; bare-metal and passthrough GPUs have no license state",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "a DCGM profiling (DCP) metric: hardware performance "
    "counters that only DCGM's host engine multiplexes; NVML has no equivalent before GPM "
    "(Hopper and newer only)",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "a DCGM profiling (DCP) metric, as above",
    "DCGM_FI_PROF_DRAM_ACTIVE": "a DCGM profiling (DCP) metric, as above; "
    "DCGM_FI_DEV_MEM_COPY_UTIL is NVML's nearest figure",
}
# The default set's one "label" counter: a label on every DCGM series, not a series.
DCGM_DRIVER_LABEL = "DCGM_FI_DRIVER_VERSION"

# PCIe generation -> transfer rate per lane, GT/s (AMD's ``pcie_speed`` is in GT/s).
PCIE_GT_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}


def _amd(name: str, help: str, value: Callable[[DeviceBrief], Value | None]) -> Family[Any]:
    # AMD's exporter declares every figure a gauge, its accumulating counters included.
    return Family[DeviceBrief](name, help, "gauge", value)


# AMD device-metrics-exporter names and help texts (pkg/amdgpu/gpuagent/gpuagent_gpu_metrics.go);
# our temperature is amd-smi's edge sensor, the one its ``gpu_edge_temperature`` reads.
AMD_FAMILIES: tuple[Family[Any], ...] = (
    _amd(
        "gpu_gfx_activity",
        "Graphics engine usage in Percentage (0-100)",
        attrgetter("utilization_gpu_pct"),
    ),
    _amd(
        "gpu_umc_activity",
        "Memory engine usage in Percentage (0-100)",
        attrgetter("utilization_memory_pct"),
    ),
    _amd(
        "gpu_edge_temperature", "Current edge temperature in Celsius", attrgetter("temperature_c")
    ),
    _amd(
        "gpu_memory_temperature",
        "Current memory temperature in Celsius",
        attrgetter("memory_temperature_c"),
    ),
    _amd("gpu_power_usage", "GPU Power usage in Watts", attrgetter("power_w")),
    _amd(
        "gpu_energy_consumed",
        "Accumulated energy consumed by the GPU in uJ",
        lambda d: None if d.energy_mj is None else d.energy_mj * 1000,
    ),
    _amd(
        "gpu_total_vram",
        "Total VRAM memory of the GPU (in MB)",
        lambda d: _mib(d.memory_total_bytes),
    ),
    _amd(
        "gpu_used_vram", "Used VRAM memory of the GPU (in MB)", lambda d: _mib(d.memory_used_bytes)
    ),
    _amd(
        "gpu_free_vram", "Free VRAM memory of the GPU (in MB)", lambda d: _mib(d.memory_free_bytes)
    ),
    _amd(
        "gpu_ecc_uncorrect_total", "Total Uncorrectable error count", attrgetter("ecc_uncorrected")
    ),
    _amd("pcie_speed", "Current PCIe speed in GT/s", lambda d: PCIE_GT_S.get(d.pcie_gen or 0)),
    _amd("pcie_replay_count", "Total number of PCIe replays", attrgetter("pcie_replay_count")),
)
# One line per clock domain, labelled clock_index and clock_type (rendered by device_lines).
AMD_CLOCK = _amd("gpu_clock", "List of current GPU clock frequencies in MHz", lambda d: None)
AMD_CLOCKS: tuple[tuple[str, Callable[[DeviceBrief], float | None]], ...] = (
    ("system", attrgetter("sm_clock_mhz")),
    ("memory", attrgetter("memory_clock_mhz")),
)

DEVICE_UP = Family[DeviceBrief](
    "shardplane_device_up",
    "1 when the device reports and is present, 0 when offline; an offline device has no other "
    "series (UUID joins it to the DCGM series, whose gpu_uuid is AMD's).",
    "gauge",
    lambda d: 1 if d.online else 0,
)
DEVICE_FAMILIES: tuple[Family[Any], ...] = (*DCGM_FAMILIES, *AMD_FAMILIES, AMD_CLOCK, DEVICE_UP)

NODE_FAMILIES: tuple[Family[Any], ...] = (
    Family[View](
        "shardplane_node_up",
        "1 when the node's agent heartbeats, 0 when offline.",
        "gauge",
        lambda n: 1 if n.get("online") else 0,
    ),
    Family[View](
        "shardplane_node_last_seen_timestamp_seconds",
        "Unix time of the node's newest heartbeat.",
        "gauge",
        lambda n: float(n["last_seen"]),
    ),
)

# Labelled by instance_id, model and state.
INSTANCE_INFO = Family[View](
    "shardplane_instance_info",
    "1 per placed instance, labelled by model and state.",
    "gauge",
    lambda i: 1,
)
# Labelled by instance_id and model.
INSTANCE_FIGURES: tuple[Family[Any], ...] = (
    Family[View](
        "shardplane_instance_generation",
        "Newest generation of each instance's placement.",
        "gauge",
        lambda i: int(i["generation"]),
    ),
    Family[View](
        "shardplane_instance_stages",
        "Pipeline stages of each instance.",
        "gauge",
        lambda i: int(i["stage_count"]),
    ),
)
STAGE_STATES = ("pending", "loading", "loaded", "reserved", "failed", "unloaded")
# One line per state a stage can be in, 1 for its own (the kube-state-metrics idiom).
STAGE_STATE = Family[View](
    "shardplane_stage_state",
    "1 for the state each pipeline stage is in (label state), per instance_id and stage.",
    "gauge",
    lambda s: None,  # rendered per state by instance_lines
)
# Labelled by instance_id, model, stage, node and device_id.
STAGE_FIGURES: tuple[Family[Any], ...] = (
    Family[View](
        "shardplane_stage_layers",
        "Layers a pipeline stage holds.",
        "gauge",
        lambda s: int(s["layer_end"]) - int(s["layer_start"]),
    ),
    Family[View](
        "shardplane_stage_memory_bytes",
        "Memory a pipeline stage holds on its device.",
        "gauge",
        lambda s: int(s.get("memory_bytes") or 0),
    ),
    Family[View](
        "shardplane_stage_bytes_loaded",
        "Bytes a pipeline stage has loaded so far.",
        "gauge",
        lambda s: int(s.get("bytes_loaded") or 0),
    ),
    Family[View](
        "shardplane_stage_load_seconds",
        "Time the stage's shard took to load.",
        "gauge",
        lambda s: float(s.get("load_ms") or 0.0) / 1000.0,
    ),
)
INSTANCE_FAMILIES: tuple[Family[Any], ...] = (
    INSTANCE_INFO,
    *INSTANCE_FIGURES,
    STAGE_STATE,
    *STAGE_FIGURES,
)


def escape(value: object) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: Value) -> str:
    """A sample value as the text format writes it; a whole float without its ``.0``."""
    if type(value) is float:
        if value.is_integer() and -1e15 < value < 1e15:  # the common case first: it runs a lot
            return str(int(value))
        if math.isfinite(value):
            return repr(value)
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    return str(int(value))


def labels(pairs: Iterable[tuple[str, object]]) -> str:
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in pairs) + "}"


def sample(family: Family[Any], label_text: str, subject: Any) -> bytes | None:
    """The family's line for ``subject``, or None when it has no value."""
    value = family.value(subject)
    if value is None:
        return None
    return f"{family.name}{label_text} {number(value)}".encode()


def lines_of(
    families: Iterable[Family[Any]], label_text: str, subject: Any, out: dict[str, bytes]
) -> dict[str, bytes]:
    """Each family's line for ``subject`` into ``out`` (a family without a value: none)."""
    for family in families:
        line = sample(family, label_text, subject)
        if line is not None:
            out[family.name] = line
    return out


def host_label_from_env(env: Mapping[str, str] | None = None) -> str:
    """The host label's name: ``hostname`` unless SHARDPLANE_METRICS_HOSTNAME_LABEL says
    ``Hostname`` (a released dcgm-exporter's spelling); anything else is refused at start."""
    value = (os.environ if env is None else env).get(HOSTNAME_LABEL_ENV, "").strip()
    if not value:
        return HOSTNAME_LABELS[0]
    if value not in HOSTNAME_LABELS:
        raise ValueError(
            f"{HOSTNAME_LABEL_ENV}={value!r}: must be one of {', '.join(HOSTNAME_LABELS)}"
        )
    return value


def dcgm_device_label(index: int) -> str:
    # The exporter names a device after its /dev node.
    return f"nvidia{index}"


def exporter_vendor(vendor: str | None, name: str | None) -> str | None:
    """Whose exporter's names a device's figures take: "nvidia", "amd", or None (only
    shardplane's own series). A simulated device takes its simulated part's vendor."""
    if vendor in ("nvidia", "amd"):
        return vendor
    if vendor == "sim" and name:
        spec = gpu_spec(name)
        if spec is not None and spec.vendor in ("nvidia", "amd"):
            return spec.vendor
    return None


def label_inputs(device: DeviceBrief, hostname: str | None) -> tuple[Any, ...]:
    """What a device's labels depend on: they are formatted again only when this changes."""
    return (
        device.node,
        device.gpu,
        device.uuid,
        device.pci_bus_id,
        device.vendor,
        device.name,
        device.driver_version,
        hostname,
    )


class DeviceLabels(NamedTuple):
    """A device's formatted label sets: its vendor exporter's (with the families they go
    with) and shardplane's own."""

    families: tuple[Family[Any], ...]
    vendor: str
    own: str
    clocks: bool  # AMD's per-domain gpu_clock lines


def device_labels(
    device: DeviceBrief, hostname: str | None, host_label: str = HOSTNAME_LABELS[0]
) -> DeviceLabels:
    """The vendor exporter's label set, in its order, and shardplane's."""
    host = hostname or device.node
    kind = exporter_vendor(device.vendor, device.name)
    own = labels(
        (
            ("gpu", device.gpu),
            ("UUID", device.uuid),
            (host_label, host),
            ("node", device.node),
            ("device_id", device.id),
        )
    )
    driver = device.driver_version
    if kind == "nvidia":
        pairs: list[tuple[str, object]] = [
            ("gpu", device.gpu),
            ("UUID", device.uuid),
            ("pci_bus_id", device.pci_bus_id or ""),
            ("device", dcgm_device_label(device.gpu)),
            ("modelName", device.name or ""),
            (host_label, host),
        ]
        if driver:
            pairs.append((DCGM_DRIVER_LABEL, driver))
        return DeviceLabels(DCGM_FAMILIES, labels(pairs), own, False)
    if kind == "amd":
        pairs = [
            ("gpu_id", device.gpu),
            ("gpu_uuid", device.uuid),
            ("card_model", device.name or ""),
            ("hostname", host),
        ]
        if driver:
            pairs.append(("driver_version", driver))
        return DeviceLabels(AMD_FAMILIES, labels(pairs), own, True)
    return DeviceLabels((), "", own, False)


def device_lines(device: DeviceBrief, held: DeviceLabels) -> dict[str, bytes]:
    """One line per family for one device (AMD's gpu_clock: one per clock domain, joined).
    An offline device has only its ``up`` line: its last figures are not current."""
    out = lines_of((DEVICE_UP,), held.own, device, {})
    if not device.online:
        return out
    lines_of(held.families, held.vendor, device, out)
    if held.clocks:
        base = held.vendor[1:-1]
        clocks = [
            f'{AMD_CLOCK.name}{{clock_index="0",clock_type="{kind}",{base}}} {number(v)}'.encode()
            for kind, read in AMD_CLOCKS
            if (v := read(device)) is not None
        ]
        if clocks:
            out[AMD_CLOCK.name] = b"\n".join(clocks)
    return out


def instance_lines(instance: Mapping[str, Any]) -> dict[str, bytes]:
    """Lines per family for one instance view and its stages (a family's lines joined)."""
    iid, model = instance["instance_id"], instance["model"]
    out: dict[str, list[bytes]] = {}

    def add(family: Family[Any], label_text: str, subject: Any) -> None:
        line = sample(family, label_text, subject)
        if line is not None:
            out.setdefault(family.name, []).append(line)

    add(
        INSTANCE_INFO,
        labels((("instance_id", iid), ("model", model), ("state", instance["state"]))),
        instance,
    )
    base = labels((("instance_id", iid), ("model", model)))
    for family in INSTANCE_FIGURES:
        add(family, base, instance)
    for stage in instance.get("stages") or ():
        where = (
            ("instance_id", iid),
            ("model", model),
            ("stage", stage["stage"]),
            ("node", stage["node"]),
            ("device_id", stage.get("device") or ""),
        )
        for state in STAGE_STATES:
            out.setdefault(STAGE_STATE.name, []).append(
                f"{STAGE_STATE.name}{labels((*where, ('state', state)))} "
                f"{1 if stage['state'] == state else 0}".encode()
            )
        stage_labels = labels(where)
        for family in STAGE_FIGURES:
            add(family, stage_labels, stage)
    return {name: b"\n".join(group) for name, group in out.items()}


def node_lines(node: Mapping[str, Any], host_label: str = HOSTNAME_LABELS[0]) -> dict[str, bytes]:
    """A node's liveness; an offline node keeps both (its last heartbeat's time is a fact)."""
    lab = labels((("node", node["id"]), (host_label, node.get("hostname") or node["id"])))
    return lines_of(NODE_FAMILIES, lab, node, {})


def family_head(family: Family[Any]) -> bytes:
    return f"# HELP {family.name} {family.help}\n# TYPE {family.name} {family.type}\n".encode()


def family_block(family: Family[Any], lines: Iterable[bytes]) -> bytes:
    body = b"\n".join(lines)
    return family_head(family) + body + b"\n" if body else family_head(family)


# (family, label): the value is the count itself.
SUMMARY_FAMILIES: tuple[tuple[Family[int], str], ...] = (
    (
        Family[int]("shardplane_devices", "Devices in the cluster state, by status.", "gauge", int),
        "status",
    ),
    (
        Family[int]("shardplane_nodes", "Nodes in the cluster state, by status.", "gauge", int),
        "status",
    ),
    (
        Family[int]("shardplane_instances", "Placed instances, by overall state.", "gauge", int),
        "state",
    ),
)


def summary_lines(
    devices_by_status: Mapping[str, int],
    nodes_by_status: Mapping[str, int],
    instances_by_state: Mapping[str, int],
) -> bytes:
    """Fleet counts: small, so rendered on each rebuild rather than kept per entry."""
    counts = (devices_by_status, nodes_by_status, instances_by_state)
    return b"".join(
        family_block(
            family,
            (sample(family, labels(((label, key),)), n) or b"" for key, n in sorted(by.items())),
        )
        for (family, label), by in zip(SUMMARY_FAMILIES, counts, strict=True)
    )


class LineBook:
    """Pre-formatted lines per family, keyed by the KV key they came from.

    Dicts keep insertion order and an update in place keeps a key's position, so a family's
    block is one join rather than a format per line; it is kept until one of the family's own
    lines changes (an unchanged line, such as a steady clock, leaves it alone)."""

    def __init__(self, families: tuple[Family[Any], ...]) -> None:
        self.families = families
        self.lines: dict[str, dict[str, bytes]] = {f.name: {} for f in families}
        self._blocks: dict[str, bytes] = {}
        self.version = 0  # bumped by every change that alters a line

    def set(self, key: str, lines: Mapping[str, bytes]) -> None:
        for name, per_key in self.lines.items():
            line = lines.get(name)
            if per_key.get(key) == line:
                continue
            if line is None:
                del per_key[key]
            else:
                per_key[key] = line
            self._blocks.pop(name, None)
            self.version += 1

    def drop(self, key: str) -> None:
        self.set(key, {})

    def blocks(self) -> Iterator[bytes]:
        """Each family's block, joined again only where a line changed since the last time."""
        for family in self.families:
            block = self._blocks.get(family.name)
            if block is None:
                block = family_block(family, self.lines[family.name].values())
                self._blocks[family.name] = block
            yield block


class MetricsBook:
    """Every state family of a scrape: devices, nodes, instances and their stages."""

    def __init__(self, host_label: str = HOSTNAME_LABELS[0]) -> None:
        self.host_label = host_label
        self.device = LineBook(DEVICE_FAMILIES)
        self.node = LineBook(NODE_FAMILIES)
        self.instance = LineBook(INSTANCE_FAMILIES)
        self.renders = 0

    @property
    def version(self) -> int:
        """Grows with every change of any line: a render knows whether it is current."""
        return self.device.version + self.node.version + self.instance.version

    def parts(self, summary: Callable[[], bytes]) -> Iterator[bytes]:
        """The scrape text, one family at a time (a caller can yield to its loop between)."""
        yield summary()
        for book in (self.device, self.node, self.instance):
            yield from book.blocks()

    def render(self, summary: Callable[[], bytes]) -> bytes:
        self.renders += 1
        return b"".join(self.parts(summary))
