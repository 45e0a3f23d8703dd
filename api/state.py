"""The API's in-memory copy of the ``cluster_state`` bucket, fed one KV entry at a time.

Every request is served from here, never from a KV scan: at 8,000 devices a scan costs
seconds, and a watch costs one message per change. Each change is decoded and validated once
and encoded to JSON once (that same byte string goes into the list responses and into the
server-sent event); a device's Prometheus lines are formatted at the next render after it
changed. List bodies are snapshots taken on a request (api.body: joined only slice by slice as
they are sent) and kept until their contents change, and while they keep changing are taken
again at most every LIST_MAX_AGE_S (0.25 s).
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from shardplane.api import metrics
from shardplane.api.body import Body, Joined
from shardplane.api.views import (
    DeviceBrief,
    View,
    build_topology,
    device_brief,
    device_json,
    instance_view,
    node_summaries,
    node_view,
    topology_signature,
)
from shardplane.bus import codec, keys
from shardplane.bus.liveness import judge_device, judge_node, reader_ttl
from shardplane.bus.messages import DeviceState, InstanceState, NodeState

log = logging.getLogger(__name__)

Kind = keys.Kind
KINDS: tuple[Kind, ...] = ("device", "node", "instance")

_json = msgspec.json.Encoder()
_json_decode = msgspec.json.Decoder(dict[str, Any]).decode

# How stale a list answer (devices, nodes, placements, topology) may be while the fleet
# changes. At 8,000 devices a list body is megabytes joined from per-entry JSON (the nodes and
# the topology are computed afresh), and under constant change every request would rebuild it:
# instead a changed body is rebuilt on a request at most this often, so a list shows the cache
# as of at most this long ago. An unchanged body is served as built; single-entry answers and
# the event stream (which carries every change) are never held back.
LIST_MAX_AGE_S = 0.25


def kind_of(key: str) -> Kind | None:
    return keys.kind_of(key)


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

    def record(self, key: str, device: DeviceBrief) -> None:
        ts = device.ts
        if ts <= self._last_ts.get(key, float("-inf")):
            return  # the same sample again (a liveness-only update), or an older one replayed
        self._last_ts[key] = ts
        ring = self._rings.get(key)
        if ring is None:
            ring = array("f", bytes(4 * len(self.FIELDS) * self.points))
            self._rings[key] = ring
            self._next[key] = 0
            self._count[key] = 0
        at = self._next[key] * len(self.FIELDS)
        ring[at] = ts - self.base
        ring[at + 1] = _num(device.utilization_gpu_pct)
        ring[at + 2] = _num(device.memory_used_bytes)
        ring[at + 3] = _num(device.temperature_c)
        ring[at + 4] = _num(device.power_w)
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


_NAN = float("nan")


def _num(value: float | None) -> float:
    return _NAN if value is None else value


class ClusterCache:
    def __init__(
        self,
        history_points: int = 150,
        max_age_s: float = LIST_MAX_AGE_S,
        host_label: str = metrics.HOSTNAME_LABELS[0],
    ) -> None:
        # Nodes and instances as views (few); devices as briefs plus JSON (see DeviceBrief).
        self.views: dict[Kind, dict[str, View]] = {k: {} for k in KINDS}
        self.briefs: dict[str, DeviceBrief] = {}
        self.json: dict[Kind, dict[str, bytes]] = {k: {} for k in KINDS}
        self.revisions: dict[str, int] = {}
        self.revision = 0  # highest KV revision applied
        self.updates = 0
        self.invalid = 0  # entries that failed to decode (logged, skipped)
        self.ready = False  # the watch has delivered the bucket's initial contents
        self.metrics = metrics.MetricsBook(host_label)
        self.history = History(history_points)
        self._node_devices: dict[str, set[str]] = {}
        self._hostnames: dict[str, str] = {}
        self._labels: dict[str, tuple[tuple[Any, ...], metrics.DeviceLabels]] = {}
        self._metrics_stale: set[str] = set()  # devices whose lines are not formatted yet
        self._topo_sigs: dict[str, tuple[Any, ...]] = {}
        self._sorted: dict[Kind, list[str] | None] = {k: None for k in KINDS}
        self.max_age_s = max_age_s
        self._bodies: dict[str, tuple[Body, float]] = {}  # name -> (body, monotonic built)
        self._changed: set[str] = set()  # bodies whose contents changed since they were built
        # What the projector wrote for each device and node, (value, revision): liveness is
        # judged again on the API's clock (bus.liveness), so an outage of the projector or of
        # NATS shows stale devices rather than the last "online" written. A device's is kept
        # as the bytes it came in and decoded again only when it is judged stale: 8,000 decoded
        # DeviceStates, replaced every interval, are objects the cycle collector must walk on
        # each full collection (over 20 ms of the event loop every few seconds, at 4,000
        # samples/s on this machine), where bytes are not tracked at all.
        self._written: dict[str, tuple[bytes | NodeState, int]] = {}
        self.newest_seen = 0.0  # the newest last_seen in the view: how current it is

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
            if kind == "device":
                device = codec.decode(DeviceState, value)
                self._wrote(key, bytes(value), device.last_seen, revision)
                return self._put_device(key, device, revision)
            if kind == "node":
                node = codec.decode(NodeState, value)
                self._wrote(key, node, node.last_seen, revision)
                view = node_view(node, revision)
            else:
                view = instance_view(codec.decode(InstanceState, value), revision)
        except codec.DecodeError as exc:
            self.invalid += 1
            log.warning("cluster_state %s: skipped, undecodable value (%s)", key, exc)
            return None
        return self._put_view(kind, key, view, revision)

    def _wrote(self, key: str, value: bytes | NodeState, last_seen: float, revision: int) -> None:
        self._written[key] = (value, revision)
        self.newest_seen = max(self.newest_seen, last_seen)

    def view_age(self, now: float) -> float | None:
        """Seconds since the newest sample in the view (None: no devices or nodes yet)."""
        return now - self.newest_seen if self.newest_seen else None

    def view_ttl(self, ttl_s: float | None = None) -> float:
        """How old the view may get: the longest reader TTL of any node in it."""
        return max(
            (reader_ttl(n, ttl_s) for n in self._node_states()), default=reader_ttl(None, ttl_s)
        )

    def _node_states(self) -> list[NodeState]:
        """What the projector wrote for each node (a thousand, where devices are thousands
        more: never found by a pass over every entry)."""
        written = self._written
        held = (written.get(k, (None, 0))[0] for k in self.views["node"])
        return [n for n in held if isinstance(n, NodeState)]

    def expire(self, now: float, ttl_s: float | None = None) -> list[Change]:
        """Show as offline (stale) every device and node still shown online whose newest
        sample is older than the reader's TTL on ``now``: the projector would have written
        that itself, had it (or NATS) been there. A later write from the projector replaces
        the judgement as usual."""
        changes: list[Change] = []
        # The shortest TTL any device can have: younger samples need no closer look. This runs
        # every half second on the API's event loop, so the pass over every device is one
        # comparison each (at 8,000 devices a pass that also parsed every key held requests
        # up for tens of milliseconds on a busy machine).
        floor = min((reader_ttl(n, ttl_s) for n in self._node_states()), default=math.inf)
        cutoff = now - min(floor, reader_ttl(None, ttl_s))
        suspects = [k for k, b in self.briefs.items() if b.online and b.last_seen < cutoff]
        for key in suspects:
            raw, revision = self._written.get(key, (None, 0))
            if not isinstance(raw, bytes):
                continue
            device = codec.decode(DeviceState, raw)  # it decoded when it was applied
            node = self._written.get(keys.node_key(device.sample.node), (None, 0))[0]
            judged = judge_device(device, node if isinstance(node, NodeState) else None, now, ttl_s)
            if judged is not device:
                changes.append(self._put_device(key, judged, revision))
        for key, view in list(self.views["node"].items()):
            written = self._written.get(key)
            if not view.get("online") or written is None:
                continue
            node, revision = written
            if isinstance(node, NodeState) and (judged := judge_node(node, now, ttl_s)) is not node:
                changes.append(self._put_view("node", key, node_view(judged, revision), revision))
        return changes

    def _stored(self, kind: Kind, key: str, encoded: bytes, revision: int) -> None:
        self.revisions[key] = revision
        self.updates += 1
        if key not in self.json[kind]:
            self._sorted[kind] = None
        self.json[kind][key] = encoded
        self._changed.add(kind)

    def _put_device(self, key: str, state: DeviceState, revision: int) -> Change:
        """A device sample, thousands a second at scale: everything is read off the message
        (no view dict), and its metric lines are formatted at the next render, not here: a
        device sampled every 2 s is then formatted once per render, or never without scrapes."""
        brief = device_brief(state)
        encoded = device_json(state, revision)
        self._stored("device", key, encoded, revision)
        self.briefs[key] = brief
        self._node_devices.setdefault(brief.node, set()).add(key)
        self._metrics_stale.add(key)
        self.history.record(key, brief)
        self._changed.add("node")
        sig = topology_signature(state)
        if self._topo_sigs.get(key) != sig:
            self._topo_sigs[key] = sig
            self._changed.add("topology")
        return Change("device", "put", key, brief.id, revision, encoded)

    def _put_view(self, kind: Kind, key: str, view: View, revision: int) -> Change:
        """A node heartbeat or an instance: few, so kept as views and formatted at once."""
        encoded = _json.encode(view)
        self._stored(kind, key, encoded, revision)
        self.views[kind][key] = view
        if kind == "node":
            node = str(view["id"])
            hostname = str(view.get("hostname") or "") or node
            if self._hostnames.get(node) != hostname:
                self._hostnames[node] = hostname
                # The device lines carry the host label: format this node's devices again.
                self._metrics_stale.update(self._node_devices.get(node, ()))
            self.metrics.node.set(key, metrics.node_lines(view, self.metrics.host_label))
            sig = (
                view["status"],
                view.get("hostname"),
                view.get("interconnect"),
                repr(view.get("links")),
            )
            if self._topo_sigs.get(key) != sig:
                self._topo_sigs[key] = sig
                self._changed.add("topology")
        else:
            self.metrics.instance.set(key, metrics.instance_lines(view))
        return Change(kind, "put", key, str(view["id"]), revision, encoded)

    def _set_device_metrics(self, key: str, device: DeviceBrief) -> None:
        # Formatting the vendor's labels is most of a line's cost and they almost never change:
        # keep them per device and format again only when what they show changes.
        hostname = self._hostnames.get(device.node)
        inputs = metrics.label_inputs(device, hostname)
        held = self._labels.get(key)
        if held is None or held[0] != inputs:
            held = (inputs, metrics.device_labels(device, hostname, self.metrics.host_label))
            self._labels[key] = held
        self.metrics.device.set(key, metrics.device_lines(device, held[1]))

    def _delete(self, kind: Kind, key: str, revision: int) -> Change | None:
        self.revisions[key] = revision
        self._written.pop(key, None)
        raw = self.json[kind].pop(key, None)
        view = self.views[kind].pop(key, None)
        brief = self.briefs.pop(key, None)
        if raw is None:
            return None
        ident = brief.id if brief is not None else str(view["id"]) if view is not None else key
        self.updates += 1
        self._sorted[kind] = None
        self._changed.add(kind)
        self._changed.add("topology")
        self._topo_sigs.pop(key, None)
        if kind == "device":
            if brief is not None:
                self._node_devices.get(brief.node, set()).discard(key)
            self.metrics.device.drop(key)
            self._metrics_stale.discard(key)
            self._labels.pop(key, None)
            self.history.drop(key)
            self._changed.add("node")
        elif kind == "node":
            self.metrics.node.drop(key)
        else:
            self.metrics.instance.drop(key)
        return Change(kind, "delete", key, ident, revision, b"null")

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

    def _cached(self, name: str, build: Callable[[], Body]) -> Body:
        """The body ``name`` as last built, rebuilt when its contents changed, but at most once
        per ``max_age_s``: see LIST_MAX_AGE_S."""
        held = self._bodies.get(name)
        now = time.monotonic()
        if held is not None and (name not in self._changed or now - held[1] < self.max_age_s):
            return held[0]
        self._changed.discard(name)
        body = build()
        self._bodies[name] = (body, now)
        return body

    def _joined(self, kind: Kind, field: str) -> Body:
        """``{"count", "revision", field: [...]}`` of the entries' ready-made JSON, as a
        snapshot joined only as it is sent (api.body)."""

        def build() -> Joined:
            parts = self.json[kind]
            names = self.sorted_keys(kind)
            head = f'{{"count":{len(names)},"revision":{self.revision},"{field}":['.encode()
            return Joined(head, list(map(parts.__getitem__, names)), b"]}")

        return self._cached(kind, build)

    def devices_body(self) -> Body:
        return self._joined("device", "devices")

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

    def nodes_body(self) -> Body:
        def build() -> bytes:
            asdict = msgspec.structs.asdict
            briefs = [{**asdict(b), "index": b.gpu} for b in self.device_briefs()]
            nodes = node_summaries(self.node_list(), briefs)
            return _json.encode({"count": len(nodes), "revision": self.revision, "nodes": nodes})

        return self._cached("node", build)

    def placements_body(self) -> Body:
        return self._joined("instance", "placements")

    def topology_body(self) -> Body:
        def build() -> bytes:
            topo = build_topology(self.node_list(), self.device_list())
            topo["revision"] = self.revision
            return _json.encode(topo)

        return self._cached("topology", build)

    def instance_json(self, instance_id: str) -> bytes | None:
        return self.json["instance"].get(keys.instance_key(instance_id))

    def device_json(self, node: str, index: int) -> bytes | None:
        return self.json["device"].get(keys.device_key(node, index))

    def summary_metrics(self) -> bytes:
        devices = Counter(b.status for b in self.briefs.values())
        nodes = Counter(str(v["status"]) for v in self.views["node"].values())
        instances = Counter(str(v["state"]) for v in self.views["instance"].values())
        for status in ("online", "offline"):
            devices.setdefault(status, 0)
            nodes.setdefault(status, 0)
        return metrics.summary_lines(devices, nodes, instances)

    def format_stale(self, limit: int | None = None) -> int:
        """Format the lines of up to ``limit`` changed devices; returns how many remain.

        In slices, so the server can yield to its event loop between them: every device of a
        big fleet at once would hold the loop for tens of milliseconds."""
        stale = self._metrics_stale
        briefs = self.briefs
        for _ in range(len(stale) if limit is None else min(limit, len(stale))):
            key = stale.pop()
            brief = briefs.get(key)
            if brief is not None:
                self._set_device_metrics(key, brief)
        return len(stale)

    def metrics_dirty(self, version: int) -> bool:
        """Whether the scrape text rendered at ``version`` is out of date."""
        return bool(self._metrics_stale) or self.metrics.version != version

    def metrics_body(self) -> bytes:
        """The state part of a scrape, rendered at once (the server renders it in slices)."""
        self.format_stale()
        return self.metrics.render(self.summary_metrics)
