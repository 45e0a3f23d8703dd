"""Prometheus text exposition, rendered from the cached cluster state.

GPU figures use the metric names and label names of NVIDIA's DCGM exporter (``gpu``, ``UUID``,
``pci_bus_id``, ``device``, ``modelName``, ``Hostname``, in that order) so Grafana dashboards
built for it work unchanged; shardplane adds a ``node`` label (its node id) and its own
``shardplane_*`` families for liveness, placements and pipeline stages.

At 8,000 devices a scrape holds about 70,000 lines: formatting them per request would cost
tens of milliseconds, so each device's lines are formatted once when its KV entry changes
(:func:`device_lines`), kept per family in insertion order (:class:`MetricsBook`), and the
joined text is cached until the next change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

MIB = 1024 * 1024

# (name, help, type). Help texts follow the DCGM exporter's wording where it has the metric.
# The DCGM families are those of its default counter set that a shardplane agent measures;
# each device line costs ~190 bytes, so at 8,000 devices every family adds 1.5 MB to a scrape.
DEVICE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "gauge"),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", "gauge"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "gauge"),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "gauge"),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "gauge"),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "gauge"),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "gauge"),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", "gauge"),
    (
        "shardplane_device_up",
        "1 when the device reports and is present, 0 when offline (labels join the DCGM ones "
        "on gpu, UUID and Hostname).",
        "gauge",
    ),
)
DEVICE_FAMILY_NAMES = tuple(f[0] for f in DEVICE_FAMILIES)

STAGE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    (
        "shardplane_stage_state",
        "1 for the state each pipeline stage is in (label state), per instance and stage.",
        "gauge",
    ),
    ("shardplane_stage_layers", "Layers a pipeline stage holds.", "gauge"),
    ("shardplane_stage_memory_bytes", "Memory a pipeline stage holds on its device.", "gauge"),
    ("shardplane_stage_bytes_loaded", "Bytes a pipeline stage has loaded so far.", "gauge"),
    ("shardplane_stage_load_milliseconds", "Time the stage's shard took to load.", "gauge"),
)
INSTANCE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("shardplane_instance_info", "1 per placed instance, labelled by model and state.", "gauge"),
    ("shardplane_instance_generation", "Newest generation of each instance's placement.", "gauge"),
    ("shardplane_instance_stages", "Pipeline stages of each instance.", "gauge"),
)
NODE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("shardplane_node_up", "1 when the node's agent heartbeats, 0 when offline.", "gauge"),
    (
        "shardplane_node_last_seen_timestamp_seconds",
        "Unix time of the node's newest heartbeat.",
        "gauge",
    ),
)


def escape(value: object) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: float) -> str:
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def labels(pairs: Iterable[tuple[str, object]]) -> str:
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in pairs) + "}"


def dcgm_device_label(vendor: str | None, index: int) -> str:
    # The exporter names NVIDIA devices after their /dev node; others get the vendor's prefix.
    return f"nvidia{index}" if vendor in (None, "nvidia") else f"{vendor}{index}"


def label_inputs(device: Mapping[str, Any], hostname: str | None) -> tuple[Any, ...]:
    """What a device's labels depend on: they are formatted again only when this changes."""
    return (
        device["node"],
        device["index"],
        device["uuid"],
        device.get("pci_bus_id"),
        device.get("vendor"),
        device.get("name"),
        hostname,
    )


def device_labels(device: Mapping[str, Any], hostname: str | None) -> tuple[str, str]:
    """The DCGM exporter's label set, in its order, and shardplane's (which adds ``node``)."""
    node = str(device["node"])
    index = int(device["index"])
    host = hostname or node
    dcgm = labels(
        (
            ("gpu", index),
            ("UUID", device["uuid"]),
            ("pci_bus_id", device.get("pci_bus_id") or ""),
            ("device", dcgm_device_label(device.get("vendor"), index)),
            ("modelName", device.get("name") or ""),
            ("Hostname", host),
        )
    )
    own = labels((("gpu", index), ("UUID", device["uuid"]), ("Hostname", host), ("node", node)))
    return dcgm, own


def device_lines(device: Mapping[str, Any], dcgm: str, own: str) -> dict[str, bytes]:
    """One line per family for one device view, given its formatted label sets; a figure the
    device did not report has no line (as the DCGM exporter leaves out unsupported fields).

    Runs for every device sample (thousands a second at scale), hence the plain-type fast
    paths: values come from validated messages, so they are ints, floats or None."""
    out: dict[str, bytes] = {}
    for name, field in _DCGM_FIELDS:
        value: Any = device.get(field)
        kind: object = value.__class__  # bool is not int here: a flag is never a figure
        if kind is int:
            text = str(value // MIB if field in _MIB_FIELDS else value)
        elif kind is float:
            if field in _MIB_FIELDS:
                text = str(int(value) // MIB)  # DCGM reports framebuffer figures in whole MiB
            elif value.is_integer() and abs(value) < 1e15:
                text = str(int(value))
            else:
                text = number(value)
        else:
            continue  # None (not reported) or anything unexpected
        out[name] = f"{name}{dcgm} {text}".encode()
    out["shardplane_device_up"] = (
        f"shardplane_device_up{own} {1 if device.get('online') else 0}".encode()
    )
    return out


_DCGM_FIELDS: tuple[tuple[str, str], ...] = (
    ("DCGM_FI_DEV_GPU_UTIL", "utilization_gpu_pct"),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "utilization_memory_pct"),
    ("DCGM_FI_DEV_FB_USED", "memory_used_bytes"),
    ("DCGM_FI_DEV_FB_FREE", "memory_free_bytes"),
    ("DCGM_FI_DEV_GPU_TEMP", "temperature_c"),
    ("DCGM_FI_DEV_POWER_USAGE", "power_w"),
    ("DCGM_FI_DEV_SM_CLOCK", "sm_clock_mhz"),
    ("DCGM_FI_DEV_MEM_CLOCK", "memory_clock_mhz"),
)
_MIB_FIELDS = frozenset({"memory_used_bytes", "memory_free_bytes"})


STAGE_STATES = ("pending", "loading", "loaded", "reserved", "failed", "unloaded")


def instance_lines(instance: Mapping[str, Any]) -> dict[str, list[str]]:  # (few: text is fine)
    """Lines per family for one instance view and its stages."""
    iid, model = instance["instance_id"], instance["model"]
    out: dict[str, list[str]] = {}
    inst_lab = labels((("instance", iid), ("model", model), ("state", instance["state"])))
    out["shardplane_instance_info"] = [f"shardplane_instance_info{inst_lab} 1"]
    base = labels((("instance", iid), ("model", model)))
    out["shardplane_instance_generation"] = [
        f"shardplane_instance_generation{base} {int(instance['generation'])}"
    ]
    out["shardplane_instance_stages"] = [
        f"shardplane_instance_stages{base} {int(instance['stage_count'])}"
    ]
    for stage in instance.get("stages") or ():
        where = (
            ("instance", iid),
            ("model", model),
            ("stage", stage["stage"]),
            ("node", stage["node"]),
            ("device", stage.get("device") or ""),
        )
        for state in STAGE_STATES:
            lab = labels((*where, ("state", state)))
            out.setdefault("shardplane_stage_state", []).append(
                f"shardplane_stage_state{lab} {1 if stage['state'] == state else 0}"
            )
        lab = labels(where)
        layers = int(stage["layer_end"]) - int(stage["layer_start"])
        out.setdefault("shardplane_stage_layers", []).append(
            f"shardplane_stage_layers{lab} {layers}"
        )
        out.setdefault("shardplane_stage_memory_bytes", []).append(
            f"shardplane_stage_memory_bytes{lab} {int(stage.get('memory_bytes') or 0)}"
        )
        out.setdefault("shardplane_stage_bytes_loaded", []).append(
            f"shardplane_stage_bytes_loaded{lab} {int(stage.get('bytes_loaded') or 0)}"
        )
        out.setdefault("shardplane_stage_load_milliseconds", []).append(
            f"shardplane_stage_load_milliseconds{lab} {number(float(stage.get('load_ms') or 0.0))}"
        )
    return out


def node_lines(node: Mapping[str, Any]) -> dict[str, str]:
    lab = labels((("node", node["id"]), ("Hostname", node.get("hostname") or node["id"])))
    return {
        "shardplane_node_up": f"shardplane_node_up{lab} {1 if node.get('online') else 0}",
        "shardplane_node_last_seen_timestamp_seconds": (
            f"shardplane_node_last_seen_timestamp_seconds{lab} {number(float(node['last_seen']))}"
        ),
    }


def family_block(name: str, help_text: str, kind: str, lines: Iterable[str]) -> str:
    body = "\n".join(lines)
    head = f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"
    return head + body + "\n" if body else head


def summary_lines(
    devices_by_status: Mapping[str, int],
    nodes_by_status: Mapping[str, int],
    instances_by_state: Mapping[str, int],
) -> str:
    """Fleet counts: small, so rendered on each rebuild rather than kept per entry."""
    blocks = [
        family_block(
            "shardplane_devices",
            "Devices in the cluster state, by status.",
            "gauge",
            (
                f'shardplane_devices{{status="{s}"}} {n}'
                for s, n in sorted(devices_by_status.items())
            ),
        ),
        family_block(
            "shardplane_nodes",
            "Nodes in the cluster state, by status.",
            "gauge",
            (f'shardplane_nodes{{status="{s}"}} {n}' for s, n in sorted(nodes_by_status.items())),
        ),
        family_block(
            "shardplane_instances",
            "Placed instances, by overall state.",
            "gauge",
            (
                f'shardplane_instances{{state="{s}"}} {n}'
                for s, n in sorted(instances_by_state.items())
            ),
        ),
    ]
    return "".join(blocks)


class MetricsBook:
    """Pre-formatted lines per family, keyed by the KV key they came from.

    Dicts keep insertion order and an update in place keeps a key's position, so a scrape is a
    join per family rather than a format per device. Device lines are bytes (8,000 devices make
    ~70,000 of them: joining bytes skips encoding megabytes of text on every render)."""

    def __init__(self) -> None:
        self.device: dict[str, dict[str, bytes]] = {name: {} for name in DEVICE_FAMILY_NAMES}
        self.instance: dict[str, dict[str, list[str]]] = {
            f[0]: {} for f in (*INSTANCE_FAMILIES, *STAGE_FAMILIES)
        }
        self.node: dict[str, dict[str, str]] = {f[0]: {} for f in NODE_FAMILIES}
        self._text: bytes | None = None
        self.version = 0  # bumped by every change, so a render knows whether it is current
        self.renders = 0

    @property
    def dirty(self) -> bool:
        return self._text is None

    def invalidate(self) -> None:
        self._text = None
        self.version += 1

    def set_device(self, key: str, lines: Mapping[str, bytes]) -> None:
        for name, per_key in self.device.items():
            line = lines.get(name)
            if line is None:
                per_key.pop(key, None)
            else:
                per_key[key] = line
        self._text = None
        self.version += 1

    def drop_device(self, key: str) -> None:
        for per_key in self.device.values():
            per_key.pop(key, None)
        self._text = None
        self.version += 1

    def set_instance(self, key: str, lines: Mapping[str, list[str]]) -> None:
        for name, per_key in self.instance.items():
            got = lines.get(name)
            if got:
                per_key[key] = got
            else:
                per_key.pop(key, None)
        self._text = None
        self.version += 1

    def drop_instance(self, key: str) -> None:
        for per_key in self.instance.values():
            per_key.pop(key, None)
        self._text = None
        self.version += 1

    def set_node(self, key: str, lines: Mapping[str, str]) -> None:
        for name, per_key in self.node.items():
            line = lines.get(name)
            if line is None:
                per_key.pop(key, None)
            else:
                per_key[key] = line
        self._text = None
        self.version += 1

    def drop_node(self, key: str) -> None:
        for per_key in self.node.values():
            per_key.pop(key, None)
        self._text = None
        self.version += 1

    def parts(self, summary: Callable[[], str]) -> Iterator[bytes]:
        """The scrape text, one family at a time (a caller can yield to its loop between)."""
        yield summary().encode()
        for name, help_text, kind in DEVICE_FAMILIES:
            lines = self.device[name]
            head = f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n".encode()
            yield head + b"\n".join(lines.values()) + b"\n" if lines else head
        text: list[str] = []
        for name, help_text, kind in NODE_FAMILIES:
            text.append(family_block(name, help_text, kind, self.node[name].values()))
        for name, help_text, kind in (*INSTANCE_FAMILIES, *STAGE_FAMILIES):
            grouped = (line for group in self.instance[name].values() for line in group)
            text.append(family_block(name, help_text, kind, grouped))
        yield "".join(text).encode()

    def keep(self, text: bytes, version: int) -> None:
        """Cache ``text`` as rendered at ``version``, unless something changed meanwhile."""
        self.renders += 1
        if version == self.version:
            self._text = text

    def render(self, summary: Callable[[], str]) -> bytes:
        """The state part of a scrape, cached until the next change."""
        if self._text is None:
            version = self.version
            text = b"".join(self.parts(summary))
            self.keep(text, version)
            return text
        return self._text
