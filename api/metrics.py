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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

MIB = 1024 * 1024

# (name, help, type). Help texts follow the DCGM exporter's wording where it has the metric.
DEVICE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "gauge"),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", "gauge"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "gauge"),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "gauge"),
    ("DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB).", "gauge"),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "gauge"),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "gauge"),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "gauge"),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", "gauge"),
    ("shardplane_device_up", "1 when the device reports and is present, 0 when offline.", "gauge"),
    (
        "shardplane_device_last_seen_timestamp_seconds",
        "Unix time of the device's newest sample.",
        "gauge",
    ),
    (
        "shardplane_device_memory_bandwidth_gbytes_per_second",
        "Theoretical peak memory bandwidth (GB/s).",
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
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def labels(pairs: Iterable[tuple[str, object]]) -> str:
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in pairs) + "}"


def dcgm_device_label(vendor: str | None, index: int) -> str:
    # The exporter names NVIDIA devices after their /dev node; others get the vendor's prefix.
    return f"nvidia{index}" if vendor in (None, "nvidia") else f"{vendor}{index}"


def device_labels(device: Mapping[str, Any], hostname: str | None) -> str:
    node = str(device["node"])
    index = int(device["index"])
    return labels(
        (
            ("gpu", index),
            ("UUID", device["uuid"]),
            ("pci_bus_id", device.get("pci_bus_id") or ""),
            ("device", dcgm_device_label(device.get("vendor"), index)),
            ("modelName", device.get("name") or ""),
            ("Hostname", hostname or node),
            ("node", node),
        )
    )


def device_lines(device: Mapping[str, Any], hostname: str | None) -> dict[str, str]:
    """One line per family for one device view; a figure the device did not report has no line
    (as the DCGM exporter leaves out fields a GPU does not support)."""
    lab = device_labels(device, hostname)
    out: dict[str, str] = {}

    def put(name: str, value: object) -> None:
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            out[name] = f"{name}{lab} {number(float(value))}"

    put("DCGM_FI_DEV_GPU_UTIL", device.get("utilization_gpu_pct"))
    put("DCGM_FI_DEV_MEM_COPY_UTIL", device.get("utilization_memory_pct"))
    used, free, total = (
        device.get("memory_used_bytes"),
        device.get("memory_free_bytes"),
        device.get("memory_total_bytes"),
    )
    # DCGM reports framebuffer figures in whole MiB.
    if isinstance(used, int):
        put("DCGM_FI_DEV_FB_USED", used // MIB)
    if isinstance(free, int):
        put("DCGM_FI_DEV_FB_FREE", free // MIB)
    if isinstance(total, int):
        put("DCGM_FI_DEV_FB_TOTAL", total // MIB)
    put("DCGM_FI_DEV_GPU_TEMP", device.get("temperature_c"))
    put("DCGM_FI_DEV_POWER_USAGE", device.get("power_w"))
    put("DCGM_FI_DEV_SM_CLOCK", device.get("sm_clock_mhz"))
    put("DCGM_FI_DEV_MEM_CLOCK", device.get("memory_clock_mhz"))
    put("shardplane_device_up", 1 if device.get("online") else 0)
    put("shardplane_device_last_seen_timestamp_seconds", device.get("last_seen"))
    put("shardplane_device_memory_bandwidth_gbytes_per_second", device.get("bandwidth_gbps"))
    return out


STAGE_STATES = ("pending", "loading", "loaded", "reserved", "failed", "unloaded")


def instance_lines(instance: Mapping[str, Any]) -> dict[str, list[str]]:
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
    join per family rather than a format per device."""

    def __init__(self) -> None:
        self.device: dict[str, dict[str, str]] = {name: {} for name in DEVICE_FAMILY_NAMES}
        self.instance: dict[str, dict[str, list[str]]] = {
            f[0]: {} for f in (*INSTANCE_FAMILIES, *STAGE_FAMILIES)
        }
        self.node: dict[str, dict[str, str]] = {f[0]: {} for f in NODE_FAMILIES}
        self._text: bytes | None = None

    def set_device(self, key: str, lines: Mapping[str, str]) -> None:
        for name, per_key in self.device.items():
            line = lines.get(name)
            if line is None:
                per_key.pop(key, None)
            else:
                per_key[key] = line
        self._text = None

    def drop_device(self, key: str) -> None:
        for per_key in self.device.values():
            per_key.pop(key, None)
        self._text = None

    def set_instance(self, key: str, lines: Mapping[str, list[str]]) -> None:
        for name, per_key in self.instance.items():
            got = lines.get(name)
            if got:
                per_key[key] = got
            else:
                per_key.pop(key, None)
        self._text = None

    def drop_instance(self, key: str) -> None:
        for per_key in self.instance.values():
            per_key.pop(key, None)
        self._text = None

    def set_node(self, key: str, lines: Mapping[str, str]) -> None:
        for name, per_key in self.node.items():
            line = lines.get(name)
            if line is None:
                per_key.pop(key, None)
            else:
                per_key[key] = line
        self._text = None

    def drop_node(self, key: str) -> None:
        for per_key in self.node.values():
            per_key.pop(key, None)
        self._text = None

    def render(self, summary: Callable[[], str]) -> bytes:
        """The state part of a scrape, cached until the next change."""
        if self._text is None:
            parts: list[str] = [summary()]
            for name, help_text, kind in DEVICE_FAMILIES:
                parts.append(family_block(name, help_text, kind, self.device[name].values()))
            for name, help_text, kind in NODE_FAMILIES:
                parts.append(family_block(name, help_text, kind, self.node[name].values()))
            for name, help_text, kind in (*INSTANCE_FAMILIES, *STAGE_FAMILIES):
                lines = (line for group in self.instance[name].values() for line in group)
                parts.append(family_block(name, help_text, kind, lines))
            self._text = "".join(parts).encode()
        return self._text

    @property
    def cached(self) -> bool:
        return self._text is not None
