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
from typing import Any, Literal

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


def kind_of(key: str) -> Kind | None:
    for prefix, kind in PREFIX.items():
        if key.startswith(prefix):
            return kind
    return None


@dataclass(frozen=True, slots=True)
class Change:
    """One applied KV change, with its server-sent event already encoded."""

    kind: Kind
    op: Literal["put", "delete"]
    key: str
    id: str
    revision: int
    event: bytes


def sse_event(kind: str, data: bytes, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\n".encode() + b"data: " + data + b"\n\n"


class History:
    """The last ``points`` samples of each device's live figures, for the dashboard's charts.

    float32 rings (time relative to a base) keep 8,000 devices x 120 points under 20 MB, where
    a deque of tuples would take five times that."""

    FIELDS = ("t", "util", "mem_used", "temp", "power")

    def __init__(self, points: int = 120) -> None:
        self.points = points
        self.base = time.time()
        self._rings: dict[str, array[float]] = {}
        self._next: dict[str, int] = {}
        self._count: dict[str, int] = {}
        self._last_ts: dict[str, float] = {}

    def record(self, key: str, view: View) -> None:
        ts = float(view.get("ts") or 0.0)
        if self._last_ts.get(key) == ts:
            return  # the same sample again (a liveness-only update)
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
        ring[at : at + len(self.FIELDS)] = array("f", row)
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
    def __init__(self, history_points: int = 120) -> None:
        self.views: dict[Kind, dict[str, View]] = {k: {} for k in KINDS}
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
        self._topo_sigs: dict[str, tuple[Any, ...]] = {}
        self._sorted: dict[Kind, list[str] | None] = {k: None for k in KINDS}
        self._bodies: dict[str, bytes] = {}

    # --- applying changes --------------------------------------------------------------------

    def apply(
        self, key: str, value: bytes | None, revision: int, deleted: bool = False
    ) -> Change | None:
        """Apply one KV entry; None when it changes nothing (a repeat, an unknown key, or a
        value that does not decode, which is logged and skipped rather than crashing the API)."""
        kind = kind_of(key)
        if kind is None:
            return None
        if revision and revision <= self.revisions.get(key, 0):
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
        is_new = key not in self.views[kind]
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
            self.metrics.set_device(key, metrics.device_lines(view, self._hostnames.get(node)))
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
                # The device lines carry the Hostname label: re-render this node's devices.
                for dev_key in self._node_devices.get(node, ()):
                    dev = self.views["device"].get(dev_key)
                    if dev is not None:
                        self.metrics.set_device(dev_key, metrics.device_lines(dev, hostname))
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

    def _delete(self, kind: Kind, key: str, revision: int) -> Change | None:
        self.revisions[key] = revision
        view = self.views[kind].pop(key, None)
        self.json[kind].pop(key, None)
        if view is None:
            return None
        self.updates += 1
        self._sorted[kind] = None
        self._bodies.pop(kind, None)
        self._bodies.pop("topology", None)
        self._topo_sigs.pop(key, None)
        if kind == "device":
            self._node_devices.get(str(view["node"]), set()).discard(key)
            self.metrics.drop_device(key)
            self.history.drop(key)
            self._bodies.pop("node", None)
        elif kind == "node":
            self.metrics.drop_node(key)
        else:
            self.metrics.drop_instance(key)
        return self._change(kind, "delete", key, str(view["id"]), revision, b"null")

    def _change(
        self,
        kind: Kind,
        op: Literal["put", "delete"],
        key: str,
        ident: str,
        revision: int,
        value: bytes,
    ) -> Change:
        data = (
            (
                f'{{"kind":"{kind}","op":"{op}","key":{_json.encode(key).decode()},'
                f'"id":{_json.encode(ident).decode()},"revision":{revision},"value":'
            ).encode()
            + value
            + b"}"
        )
        return Change(kind, op, key, ident, revision, sse_event(kind, data, revision))

    def forget_missing(self, seen: set[str]) -> list[Change]:
        """After a re-watch: drop what vanished from the bucket while the watch was down."""
        changes: list[Change] = []
        for kind in KINDS:
            for key in [k for k in self.views[kind] if k not in seen]:
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
                keys = sorted(views, key=lambda k: (str(views[k]["node"]), int(views[k]["index"])))
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
        return [self.views["device"][k] for k in self.sorted_keys("device")]

    def node_list(self) -> list[View]:
        return [self.views["node"][k] for k in self.sorted_keys("node")]

    def instance_list(self) -> list[View]:
        return [self.views["instance"][k] for k in self.sorted_keys("instance")]

    def nodes_body(self) -> bytes:
        def build() -> bytes:
            nodes = node_summaries(self.node_list(), self.device_list())
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
        devices = Counter(str(v["status"]) for v in self.views["device"].values())
        nodes = Counter(str(v["status"]) for v in self.views["node"].values())
        instances = Counter(str(v["state"]) for v in self.views["instance"].values())
        for status in ("online", "offline"):
            devices.setdefault(status, 0)
            nodes.setdefault(status, 0)
        return metrics.summary_lines(devices, nodes, instances)

    def metrics_body(self) -> bytes:
        return self.metrics.render(self.summary_metrics)
