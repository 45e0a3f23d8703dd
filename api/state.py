"""The API's in-memory copy of the ``cluster_state`` bucket, fed one KV entry at a time.

Every request is served from here, never from a KV scan: at 8,000 devices a scan costs
seconds, and a watch costs one message per change. Each change is decoded and validated once,
turned into its API view, encoded to JSON once (that same byte string goes into the list
responses and into the server-sent event), and formatted into Prometheus lines once. List
bodies are joined lazily on the first request after a change and cached until the next one.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import msgspec

from api import metrics
from api.views import (
    View,
    build_topology,
    device_view,
    instance_view,
    node_summaries,
    node_view,
    topology_signature,
)
from bus import codec
from bus.messages import DeviceState, InstanceState, NodeState

log = logging.getLogger(__name__)

Kind = Literal["device", "node", "instance"]
KINDS: tuple[Kind, ...] = ("device", "node", "instance")
PREFIX: dict[str, Kind] = {"devices.": "device", "nodes.": "node", "instances.": "instance"}

_json = msgspec.json.Encoder()
_json_decode = msgspec.json.Decoder(dict[str, Any]).decode


class DeviceBrief(NamedTuple):
    """What the API needs of a device besides its JSON: sort keys, liveness, the sums.

    A tuple of plain values is not tracked by Python's cycle collector, where a dict view per
    device (8,000 of them, replaced every few seconds) made each full collection pause the
    event loop for ~40 ms; the full view lives on as its encoded JSON only."""

    id: str
    node: str
    gpu: int  # the device index ("index" would shadow tuple.index)
    status: str
    online: bool
    last_seen: float
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    power_w: float

    @classmethod
    def of(cls, view: View) -> DeviceBrief:
        return cls(
            str(view["id"]),
            str(view["node"]),
            int(view["index"]),
            str(view["status"]),
            bool(view["online"]),
            float(view["last_seen"]),
            int(view.get("memory_total_bytes") or 0),
            int(view.get("memory_used_bytes") or 0),
            int(view.get("memory_free_bytes") or 0),
            float(view.get("power_w") or 0.0),
        )


def kind_of(key: str) -> Kind | None:
    for prefix, kind in PREFIX.items():
        if key.startswith(prefix):
            return kind
    return None


@dataclass(frozen=True, slots=True)
class Change:
    """One applied KV change; its server-sent event is encoded only when someone listens."""

    kind: Kind
    op: Literal["put", "delete"]
    key: str
    id: str
    revision: int
    value: bytes  # the view's JSON, b"null" for a delete

    def event(self) -> bytes:
        data = (
            (
                f'{{"kind":"{self.kind}","op":"{self.op}","key":{_json.encode(self.key).decode()},'
                f'"id":{_json.encode(self.id).decode()},"revision":{self.revision},"value":'
            ).encode()
            + self.value
            + b"}"
        )
        return sse_event(self.kind, data, self.revision)


def sse_event(kind: str, data: bytes, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\n".encode() + b"data: " + data + b"\n\n"


class History:
    """The last ``points`` samples of each device's live figures, for the dashboard's charts.

    float32 rings (time relative to a base) keep 8,000 devices x 150 points (5 minutes at 2 s) near 24 MB, where
    a deque of tuples would take five times that."""

    FIELDS = ("t", "util", "mem_used", "temp", "power")

    def __init__(self, points: int = 150) -> None:
        self.points = points
        self.base = time.time()
        self._rings: dict[str, array[float]] = {}
        self._next: dict[str, int] = {}
        self._count: dict[str, int] = {}
        self._last_ts: dict[str, float] = {}

    def record(self, key: str, view: View) -> None:
        ts = float(view.get("ts") or 0.0)
        if ts <= self._last_ts.get(key, float("-inf")):
            return  # the same sample again (a liveness-only update), or an older one replayed
        self._last_ts[key] = ts
        ring = self._rings.get(key)
        if ring is None:
            ring = array("f", bytes(4 * len(self.FIELDS) * self.points))
            self._rings[key] = ring
            self._next[key] = 0
            self._count[key] = 0
        nan = float("nan")
        row = (
            ts - self.base,
            _num(view.get("utilization_gpu_pct"), nan),
            _num(view.get("memory_used_bytes"), nan),
            _num(view.get("temperature_c"), nan),
            _num(view.get("power_w"), nan),
        )
        at = self._next[key] * len(self.FIELDS)
        ring[at], ring[at + 1], ring[at + 2], ring[at + 3], ring[at + 4] = row
        self._next[key] = (self._next[key] + 1) % self.points
        self._count[key] = min(self._count[key] + 1, self.points)

    def drop(self, key: str) -> None:
        for table in (self._rings, self._next, self._count, self._last_ts):
            table.pop(key, None)

    def series(self, key: str) -> dict[str, list[float | None]] | None:
        """Oldest first, one list per field; NaN (not reported) becomes null."""
        ring = self._rings.get(key)
        if ring is None:
            return None
        width, count = len(self.FIELDS), self._count[key]
        start = (self._next[key] - count) % self.points
        out: dict[str, list[float | None]] = {name: [] for name in self.FIELDS}
        for i in range(count):
            at = ((start + i) % self.points) * width
            for j, name in enumerate(self.FIELDS):
                value = float(ring[at + j])
                if value != value:  # NaN
                    out[name].append(None)
                elif name == "t":
                    out[name].append(round(value + self.base, 3))
                else:
                    out[name].append(round(value, 3))
        return out


def _num(value: Any, default: float) -> float:
    return (
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
    )


class ClusterCache:
    def __init__(self, history_points: int = 150) -> None:
        # Nodes and instances as views (few); devices as briefs plus JSON (see DeviceBrief).
        self.views: dict[Kind, dict[str, View]] = {k: {} for k in KINDS}
        self.briefs: dict[str, DeviceBrief] = {}
        self.json: dict[Kind, dict[str, bytes]] = {k: {} for k in KINDS}
        self.revisions: dict[str, int] = {}
        self.revision = 0  # highest KV revision applied
        self.updates = 0
        self.invalid = 0  # entries that failed to decode (logged, skipped)
        self.ready = False  # the watch has delivered the bucket's initial contents
        self.metrics = metrics.MetricsBook()
        self.history = History(history_points)
        self._node_devices: dict[str, set[str]] = {}
        self._hostnames: dict[str, str] = {}
        self._labels: dict[str, tuple[tuple[Any, ...], str, str]] = {}
        self._metrics_stale: set[str] = set()  # devices whose lines are not formatted yet
        self._topo_sigs: dict[str, tuple[Any, ...]] = {}
        self._sorted: dict[Kind, list[str] | None] = {k: None for k in KINDS}
        self._bodies: dict[str, bytes] = {}

    # --- applying changes --------------------------------------------------------------------

    def apply(
        self,
        key: str,
        value: bytes | None,
        revision: int,
        deleted: bool = False,
        replay: bool = False,
    ) -> Change | None:
        """Apply one KV entry; None when it changes nothing (a repeat, an unknown key, or a
        value that does not decode, which is logged and skipped rather than crashing the API).

        ``replay``: the entry is part of a fresh watch's replay of the bucket, which is the
        truth even when its revision is lower than the one held (the bucket was recreated)."""
        kind = kind_of(key)
        if kind is None:
            return None
        held = self.revisions.get(key, 0)
        if revision and (revision == held if replay else revision <= held):
            return None  # watches may redeliver; be idempotent on revision
        self.revision = max(self.revision, revision)
        if deleted or not value:
            return self._delete(kind, key, revision)
        try:
            view = self._decode(kind, value, revision)
        except codec.DecodeError as exc:
            self.invalid += 1
            log.warning("cluster_state %s: %s", key, exc)
            return None
        self.revisions[key] = revision
        self.updates += 1
        encoded = _json.encode(view)
        is_new = key not in self.json[kind]
        if kind == "device":
            self.briefs[key] = DeviceBrief.of(view)
        else:
            self.views[kind][key] = view
        self.json[kind][key] = encoded
        if is_new:
            self._sorted[kind] = None
        self._after_put(kind, key, view)
        return self._change(kind, "put", key, str(view["id"]), revision, encoded)

    def _decode(self, kind: Kind, value: bytes, revision: int) -> View:
        if kind == "device":
            return device_view(codec.decode(DeviceState, value), revision)
        if kind == "node":
            return node_view(codec.decode(NodeState, value), revision)
        return instance_view(codec.decode(InstanceState, value), revision)

    def _after_put(self, kind: Kind, key: str, view: View) -> None:
        self._bodies.pop(kind, None)
        if kind == "device":
            node = str(view["node"])
            self._node_devices.setdefault(node, set()).add(key)
            # Lines are formatted at the next render, not here: a device sampled every 2 s
            # is then formatted once per scrape (every 15-60 s), or never without Prometheus.
            self._metrics_stale.add(key)
            self.metrics.invalidate()
            self.history.record(key, view)
            self._bodies.pop("node", None)
            sig = topology_signature(view)
            if self._topo_sigs.get(key) != sig:
                self._topo_sigs[key] = sig
                self._bodies.pop("topology", None)
        elif kind == "node":
            node = str(view["id"])
            hostname = str(view.get("hostname") or "") or node
            if self._hostnames.get(node) != hostname:
                self._hostnames[node] = hostname
                # The device lines carry the Hostname label: format this node's devices again.
                self._metrics_stale.update(self._node_devices.get(node, ()))
            self.metrics.set_node(key, metrics.node_lines(view))
            sig = (
                view["status"],
                view.get("hostname"),
                view.get("interconnect"),
                repr(view.get("links")),
            )
            if self._topo_sigs.get(key) != sig:
                self._topo_sigs[key] = sig
                self._bodies.pop("topology", None)
        else:
            self.metrics.set_instance(key, metrics.instance_lines(view))

    def _set_device_metrics(self, key: str, view: View, hostname: str | None) -> None:
        # Formatting the six DCGM labels is most of a line's cost and they almost never change:
        # keep them per device and format again only when what they show changes.
        inputs = metrics.label_inputs(view, hostname)
        held = self._labels.get(key)
        if held is None or held[0] != inputs:
            held = (inputs, *metrics.device_labels(view, hostname))
            self._labels[key] = held
        self.metrics.set_device(key, metrics.device_lines(view, held[1], held[2]))

    def _delete(self, kind: Kind, key: str, revision: int) -> Change | None:
        self.revisions[key] = revision
        raw = self.json[kind].pop(key, None)
        view = self.views[kind].pop(key, None)
        brief = self.briefs.pop(key, None)
        if raw is None:
            return None
        ident = brief.id if brief is not None else str(view["id"]) if view is not None else key
        self.updates += 1
        self._sorted[kind] = None
        self._bodies.pop(kind, None)
        self._bodies.pop("topology", None)
        self._topo_sigs.pop(key, None)
        if kind == "device":
            if brief is not None:
                self._node_devices.get(brief.node, set()).discard(key)
            self.metrics.drop_device(key)
            self._metrics_stale.discard(key)
            self._labels.pop(key, None)
            self.history.drop(key)
            self._bodies.pop("node", None)
        elif kind == "node":
            self.metrics.drop_node(key)
        else:
            self.metrics.drop_instance(key)
        return self._change(kind, "delete", key, ident, revision, b"null")

    def _change(
        self,
        kind: Kind,
        op: Literal["put", "delete"],
        key: str,
        ident: str,
        revision: int,
        value: bytes,
    ) -> Change:
        return Change(kind, op, key, ident, revision, value)

    def forget_missing(self, seen: set[str]) -> list[Change]:
        """After a re-watch: drop what vanished from the bucket while the watch was down."""
        changes: list[Change] = []
        for kind in KINDS:
            for key in [k for k in self.json[kind] if k not in seen]:
                change = self._delete(kind, key, self.revision)
                if change is not None:
                    changes.append(change)
        return changes

    # --- reading -----------------------------------------------------------------------------

    def sorted_keys(self, kind: Kind) -> list[str]:
        keys = self._sorted[kind]
        if keys is None:
            views = self.views[kind]
            if kind == "device":
                briefs = self.briefs
                keys = sorted(briefs, key=lambda k: (briefs[k].node, briefs[k].gpu))
            else:
                keys = sorted(views, key=lambda k: str(views[k]["id"]))
            self._sorted[kind] = keys
        return keys

    def _cached(self, name: str, build: Callable[[], bytes]) -> bytes:
        body = self._bodies.get(name)
        if body is None:
            body = build()
            self._bodies[name] = body
        return body

    def devices_body(self) -> bytes:
        def build() -> bytes:
            parts = self.json["device"]
            keys = self.sorted_keys("device")
            head = f'{{"count":{len(keys)},"revision":{self.revision},"devices":['.encode()
            return head + b",".join(parts[k] for k in keys) + b"]}"

        return self._cached("device", build)

    def device_list(self) -> list[View]:
        """Full device views, decoded from their JSON (for the topology, rebuilt rarely)."""
        parts = self.json["device"]
        return [_json_decode(parts[k]) for k in self.sorted_keys("device")]

    def device_briefs(self) -> list[DeviceBrief]:
        return [self.briefs[k] for k in self.sorted_keys("device")]

    def node_list(self) -> list[View]:
        return [self.views["node"][k] for k in self.sorted_keys("node")]

    def instance_list(self) -> list[View]:
        return [self.views["instance"][k] for k in self.sorted_keys("instance")]

    def nodes_body(self) -> bytes:
        def build() -> bytes:
            briefs = [{**b._asdict(), "index": b.gpu} for b in self.device_briefs()]
            nodes = node_summaries(self.node_list(), briefs)
            return _json.encode({"count": len(nodes), "revision": self.revision, "nodes": nodes})

        return self._cached("node", build)

    def placements_body(self) -> bytes:
        def build() -> bytes:
            parts = self.json["instance"]
            keys = self.sorted_keys("instance")
            head = f'{{"count":{len(keys)},"revision":{self.revision},"placements":['.encode()
            return head + b",".join(parts[k] for k in keys) + b"]}"

        return self._cached("instance", build)

    def topology_body(self) -> bytes:
        def build() -> bytes:
            topo = build_topology(self.node_list(), self.device_list())
            topo["revision"] = self.revision
            return _json.encode(topo)

        return self._cached("topology", build)

    def instance_json(self, instance_id: str) -> bytes | None:
        return self.json["instance"].get(f"instances.{instance_id}")

    def device_json(self, node: str, index: int) -> bytes | None:
        return self.json["device"].get(f"devices.{node}.{index}")

    def summary_metrics(self) -> str:
        devices = Counter(b.status for b in self.briefs.values())
        nodes = Counter(str(v["status"]) for v in self.views["node"].values())
        instances = Counter(str(v["state"]) for v in self.views["instance"].values())
        for status in ("online", "offline"):
            devices.setdefault(status, 0)
            nodes.setdefault(status, 0)
        return metrics.summary_lines(devices, nodes, instances)

    def format_stale(self, limit: int | None = None) -> int:
        """Format the lines of up to ``limit`` changed devices; returns how many remain.

        In slices, so the server can yield to its event loop between them: all 8,000 devices
        at once take a few hundred milliseconds on a busy machine."""
        parts = self.json["device"]
        stale = self._metrics_stale
        count = len(stale) if limit is None else min(limit, len(stale))
        for _ in range(count):
            key = stale.pop()
            raw = parts.get(key)
            if raw is not None:
                view = _json_decode(raw)
                self._set_device_metrics(key, view, self._hostnames.get(str(view["node"])))
        return len(stale)

    @property
    def metrics_dirty(self) -> bool:
        return bool(self._metrics_stale) or self.metrics.dirty

    def metrics_body(self) -> bytes:
        self.format_stale()
        return self.metrics.render(self.summary_metrics)
