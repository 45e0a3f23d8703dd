"""Prometheus text exposition, rendered from the cached cluster state.

GPU figures use the metric names and label names of NVIDIA's DCGM exporter (``gpu``, ``UUID``,
``pci_bus_id``, ``device``, ``modelName``, ``Hostname``, in that order) so Grafana dashboards
built for it work unchanged; shardplane adds a ``node`` label (its node id) and its own
``shardplane_*`` families for liveness, placements and pipeline stages.

Every family is one row of a table (:class:`Family`: name, help, type, how to read the value)
and one function renders any row, so adding a figure is adding a row. At 8,000 devices a scrape
holds about 70,000 lines: formatting them per request would cost tens of milliseconds, so each
device's lines are formatted once after its KV entry changes (:func:`device_lines`), kept per
family in insertion order (:class:`LineBook`), and each family's joined block is cached until
one of its own lines changes (a clock that did not move keeps its family's block).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from operator import attrgetter
from typing import Any, Generic, TypeVar

import msgspec

from shardplane.api.views import DeviceBrief, View

MIB = 1024 * 1024
# How often the server renders the scrape text afresh while something scrapes and the state
# changed: a scrape's figures are at most this (plus one render) older than the cluster state.
RENDER_INTERVAL_S = 1.0

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
    # DCGM reports framebuffer figures in whole MiB.
    return None if value is None else int(value) // MIB


# Help texts follow the DCGM exporter's wording. These are the families of its default counter
# set that a shardplane agent measures; each device line costs ~190 bytes, so at 8,000 devices
# every family adds 1.5 MB to a scrape. Labelled with the DCGM exporter's label set.
DCGM_FAMILIES: tuple[Family[Any], ...] = (
    Family[DeviceBrief](
        "DCGM_FI_DEV_GPU_UTIL",
        "GPU utilization (in %).",
        "gauge",
        attrgetter("utilization_gpu_pct"),
    ),
    Family[DeviceBrief](
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "Memory utilization (in %).",
        "gauge",
        attrgetter("utilization_memory_pct"),
    ),
    Family[DeviceBrief](
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        "gauge",
        lambda d: _mib(d.memory_used_bytes),
    ),
    Family[DeviceBrief](
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        "gauge",
        lambda d: _mib(d.memory_free_bytes),
    ),
    Family[DeviceBrief](
        "DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "gauge", attrgetter("temperature_c")
    ),
    Family[DeviceBrief](
        "DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "gauge", attrgetter("power_w")
    ),
    Family[DeviceBrief](
        "DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "gauge", attrgetter("sm_clock_mhz")
    ),
    Family[DeviceBrief](
        "DCGM_FI_DEV_MEM_CLOCK",
        "Memory clock frequency (in MHz).",
        "gauge",
        attrgetter("memory_clock_mhz"),
    ),
)
# Labelled with shardplane's label set (the DCGM join keys plus ``node``).
DEVICE_UP = Family[DeviceBrief](
    "shardplane_device_up",
    "1 when the device reports and is present, 0 when offline (labels join the DCGM ones "
    "on gpu, UUID and Hostname).",
    "gauge",
    lambda d: 1 if d.online else 0,
)
DEVICE_FAMILIES: tuple[Family[Any], ...] = (*DCGM_FAMILIES, DEVICE_UP)

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

# Labelled by instance, model and state.
INSTANCE_INFO = Family[View](
    "shardplane_instance_info",
    "1 per placed instance, labelled by model and state.",
    "gauge",
    lambda i: 1,
)
# Labelled by instance and model.
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
    "1 for the state each pipeline stage is in (label state), per instance and stage.",
    "gauge",
    lambda s: None,  # rendered per state by instance_lines
)
# Labelled by instance, model, stage, node and device.
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
        "shardplane_stage_load_milliseconds",
        "Time the stage's shard took to load.",
        "gauge",
        lambda s: float(s.get("load_ms") or 0.0),
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


def dcgm_device_label(vendor: str | None, index: int) -> str:
    # The exporter names NVIDIA devices after their /dev node; others get the vendor's prefix.
    return f"nvidia{index}" if vendor in (None, "nvidia") else f"{vendor}{index}"


def label_inputs(device: DeviceBrief, hostname: str | None) -> tuple[Any, ...]:
    """What a device's labels depend on: they are formatted again only when this changes."""
    return (
        device.node,
        device.gpu,
        device.uuid,
        device.pci_bus_id,
        device.vendor,
        device.name,
        hostname,
    )


def device_labels(device: DeviceBrief, hostname: str | None) -> tuple[str, str]:
    """The DCGM exporter's label set, in its order, and shardplane's (which adds ``node``)."""
    host = hostname or device.node
    dcgm = labels(
        (
            ("gpu", device.gpu),
            ("UUID", device.uuid),
            ("pci_bus_id", device.pci_bus_id or ""),
            ("device", dcgm_device_label(device.vendor, device.gpu)),
            ("modelName", device.name or ""),
            ("Hostname", host),
        )
    )
    own = labels(
        (("gpu", device.gpu), ("UUID", device.uuid), ("Hostname", host), ("node", device.node))
    )
    return dcgm, own


def device_lines(device: DeviceBrief, dcgm: str, own: str) -> dict[str, bytes]:
    """One line per family for one device, given its formatted label sets."""
    return lines_of((DEVICE_UP,), own, device, lines_of(DCGM_FAMILIES, dcgm, device, {}))


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
        labels((("instance", iid), ("model", model), ("state", instance["state"]))),
        instance,
    )
    base = labels((("instance", iid), ("model", model)))
    for family in INSTANCE_FIGURES:
        add(family, base, instance)
    for stage in instance.get("stages") or ():
        where = (
            ("instance", iid),
            ("model", model),
            ("stage", stage["stage"]),
            ("node", stage["node"]),
            ("device", stage.get("device") or ""),
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


def node_lines(node: Mapping[str, Any]) -> dict[str, bytes]:
    lab = labels((("node", node["id"]), ("Hostname", node.get("hostname") or node["id"])))
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

    def __init__(self) -> None:
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
