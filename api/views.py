"""Pure functions from the KV's materialised state to the API's JSON shapes.

The API flattens each KV value into one object per thing (a device's sample fields next to its
liveness), because scripts and dashboards want ``d["temperature_c"]``, not
``d["sample"]["temperature_c"]``. Nothing here touches NATS or aiohttp, so the shapes are
testable on their own and the handlers stay thin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from shardplane.bus.messages import DeviceState, InstanceState, NodeState

View = dict[str, Any]

# PCIe payload rate per lane and direction, GB/s, after line encoding (8b/10b for gen 1-2,
# 128b/130b for gen 3-5, FLIT for gen 6). Used for the same-host PCIe links of the topology.
PCIE_LANE_GBYTES: dict[int, float] = {
    1: 0.25,
    2: 0.5,
    3: 0.985,
    4: 1.969,
    5: 3.938,
    6: 7.563,
}


def device_id(node: str, index: int) -> str:
    return f"{node}/{index}"


def device_view(state: DeviceState, revision: int = 0) -> View:
    """One device: every sample field flattened, plus liveness.

    ``status`` is "offline" when the projector says so or when the agent reported the device
    lost (``present`` false); an operator wants one word to filter on."""
    sample = state.sample
    view: View = msgspec.to_builtins(sample)
    view.pop("v", None)
    view.update(msgspec.to_builtins(_liveness(state, revision)))
    return view


class _Liveness(msgspec.Struct, frozen=True, gc=False):
    """What the API adds to a DeviceSample, in the order the view lists it: liveness, then the
    names the original API design gave some figures (``device_id``, ``node_id``,
    ``memory_used_mb``, ``memory_total_mb``, ``utilization_percent``; ``temperature_c`` is the
    sample's own), so a client written against that design works unchanged. MB are MiB
    (2^20 bytes, whole), as nvidia-smi and DCGM's FB_USED count them."""

    id: str
    status: str
    online: bool
    last_seen: float
    offline_reason: str | None
    revision: int
    device_id: str
    node_id: str
    memory_used_mb: int | None
    memory_total_mb: int | None
    utilization_percent: float | None


def _online(state: DeviceState) -> bool:
    return state.online and state.sample.present


def _status(state: DeviceState) -> str:
    return "online" if _online(state) else "offline"


MIB = 1024 * 1024


def _mib(value: int | None) -> int | None:
    return None if value is None else value // MIB


def _liveness(state: DeviceState, revision: int) -> _Liveness:
    sample = state.sample
    ident = device_id(sample.node, sample.index)
    return _Liveness(
        id=ident,
        status=_status(state),
        online=_online(state),
        last_seen=state.last_seen,
        offline_reason=state.offline_reason or (None if sample.present else "device lost"),
        revision=revision,
        device_id=ident,
        node_id=sample.node,
        memory_used_mb=_mib(sample.memory_used_bytes),
        memory_total_mb=_mib(sample.memory_total_bytes),
        utilization_percent=sample.utilization_gpu_pct,
    )


_encode = msgspec.json.Encoder().encode
_V = b',"v":'


def device_json(state: DeviceState, revision: int = 0) -> bytes:
    """``device_view(state, revision)`` as JSON, byte for byte, encoded from the message.

    This runs for every sample of every device (thousands a second at scale): the sample's own
    encoding with its ``v`` member cut out and the liveness members appended takes ~7 us where
    building the view dict and encoding it takes ~10, and leaves no dict for the cycle
    collector. ``v`` is an integer that never comes first, so it sits between the first
    ``,"v":`` (a quote inside a string is escaped) and the next comma."""
    body = _encode(state.sample)
    at = body.find(_V)
    end = body.find(b",", at + len(_V)) if at > 0 else -1
    if end < 0:  # not the layout above (a changed schema): the slow way, still right
        return _encode(device_view(state, revision))
    return body[:at] + body[end:-1] + b"," + _encode(_liveness(state, revision))[1:]


class DeviceBrief(msgspec.Struct, frozen=True, gc=False):
    """What the API needs of a device besides its JSON: sort keys, liveness, node sums, chart
    and metric figures, label inputs.

    Plain values in a struct the cycle collector does not track (``gc=False``: it holds no
    containers, so it can be in no cycle), where a dict view per device (8,000 of them,
    replaced every few seconds) made each full collection pause the event loop for ~40 ms. (A
    NamedTuple was used before: unlike a plain tuple it stays tracked, and the 8,000 briefs
    replaced every interval were most of what each full collection walked.) The full view
    lives on as its encoded JSON only."""

    id: str
    node: str
    gpu: int  # the device index (named as before, when it was a tuple with .index)
    uuid: str
    status: str
    online: bool
    last_seen: float
    ts: float
    vendor: str
    name: str | None
    pci_bus_id: str | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    utilization_gpu_pct: float | None
    utilization_memory_pct: float | None
    temperature_c: float | None
    power_w: float | None
    sm_clock_mhz: float | None
    memory_clock_mhz: float | None
    driver_version: str | None
    memory_reserved_bytes: int | None
    memory_temperature_c: float | None
    energy_mj: int | None
    utilization_encoder_pct: float | None
    utilization_decoder_pct: float | None
    pcie_gen: int | None
    pcie_replay_count: int | None
    pcie_tx_bytes_per_s: float | None
    pcie_rx_bytes_per_s: float | None
    xid_last: int | None
    ecc_uncorrected: int | None
    remapped_rows_correctable: int | None
    remapped_rows_uncorrectable: int | None
    row_remap_failed: bool | None


def device_brief(state: DeviceState) -> DeviceBrief:
    s = state.sample
    online = _online(state)
    return DeviceBrief(
        device_id(s.node, s.index),
        s.node,
        s.index,
        s.uuid,
        "online" if online else "offline",
        online,
        state.last_seen,
        s.ts,
        s.vendor,
        s.name,
        s.pci_bus_id,
        s.memory_total_bytes,
        s.memory_used_bytes,
        s.memory_free_bytes,
        s.utilization_gpu_pct,
        s.utilization_memory_pct,
        s.temperature_c,
        s.power_w,
        s.sm_clock_mhz,
        s.memory_clock_mhz,
        s.driver_version,
        s.memory_reserved_bytes,
        s.memory_temperature_c,
        s.energy_mj,
        s.utilization_encoder_pct,
        s.utilization_decoder_pct,
        s.pcie_gen,
        s.pcie_replay_count,
        s.pcie_tx_bytes_per_s,
        s.pcie_rx_bytes_per_s,
        s.xid_last,
        s.ecc_uncorrected,
        s.remapped_rows_correctable,
        s.remapped_rows_uncorrectable,
        s.row_remap_failed,
    )


def node_view(state: NodeState, revision: int = 0) -> View:
    view: View = msgspec.to_builtins(state.heartbeat)
    view.pop("v", None)
    view["id"] = state.heartbeat.node
    view["status"] = "online" if state.online else "offline"
    view["online"] = state.online
    view["last_seen"] = state.last_seen
    view["offline_reason"] = state.offline_reason
    view["revision"] = revision
    return view


def instance_view(state: InstanceState, revision: int = 0) -> View:
    """An instance with the figures a reader would otherwise compute: how many layers the
    pipeline covers and which devices it runs on, in pipeline order."""
    view: View = msgspec.to_builtins(state)
    view.pop("v", None)
    view["id"] = state.instance_id
    view["layers_total"] = max((s.layer_end for s in state.stages), default=0)
    view["devices"] = [s.device for s in state.stages]
    view["revision"] = revision
    return view


def node_summaries(nodes: Iterable[View], devices: Iterable[View]) -> list[View]:
    """Nodes with their devices and fleet figures summed from those devices' newest samples.

    A node that has devices in the KV but no heartbeat yet still appears (``heartbeat`` false),
    so a half-started agent is visible rather than silently missing."""
    by_node: dict[str, list[View]] = {}
    for dev in devices:
        by_node.setdefault(str(dev["node"]), []).append(dev)
    out: dict[str, View] = {}
    for node in nodes:
        out[str(node["id"])] = {**node, "heartbeat": True}
    for name in by_node:
        if name not in out:
            online = any(d["online"] for d in by_node[name])
            out[name] = {
                "id": name,
                "node": name,
                "hostname": "",
                "status": "online" if online else "offline",
                "online": online,
                "heartbeat": False,
                "last_seen": max(float(d["last_seen"]) for d in by_node[name]),
                "offline_reason": None,
                "links": [],
                "interconnect": None,
            }
    result: list[View] = []
    for name in sorted(out):
        devs = sorted(by_node.get(name, []), key=lambda d: int(d["index"]))
        node = dict(out[name])
        node["devices"] = [d["id"] for d in devs]
        node["devices_online"] = sum(1 for d in devs if d["online"])
        node["memory_total_bytes"] = sum(int(d.get("memory_total_bytes") or 0) for d in devs)
        node["memory_free_bytes"] = sum(int(d.get("memory_free_bytes") or 0) for d in devs)
        node["memory_used_bytes"] = sum(int(d.get("memory_used_bytes") or 0) for d in devs)
        node["power_w"] = round(sum(float(d.get("power_w") or 0.0) for d in devs), 3)
        result.append(node)
    return result


def _pcie_gbytes(dev: Mapping[str, Any]) -> float | None:
    gen, width = dev.get("pcie_gen"), dev.get("pcie_width")
    if not gen or not width or int(gen) not in PCIE_LANE_GBYTES:
        return None
    return round(PCIE_LANE_GBYTES[int(gen)] * int(width), 2)


def _norm_bus_id(bus_id: str) -> str:
    # NVML writes 00000000:3B:00.0, sysfs 0000:3b:00.0: compare on the last 12 characters.
    return bus_id.strip().lower()[-12:]


def _link(
    kind: str,
    a: str,
    b: str,
    node: str | None,
    lanes: int,
    gbytes_s: float | None,
    latency_ms: float | None = None,
) -> View:
    return {
        "kind": kind,
        "a": a,
        "b": b,
        "node": node,
        "links": lanes,
        "gbit_s": round(gbytes_s * 8.0, 3) if gbytes_s is not None else None,
        "gbytes_s": round(gbytes_s, 3) if gbytes_s is not None else None,
        "latency_ms": latency_ms,
    }


def build_topology(nodes: Iterable[View], devices: Iterable[View]) -> View:
    """Nodes as boxes with their GPUs inside, and every link between them.

    Links are undirected and listed once per pair (``a`` < ``b``), each with its speed in both
    units (``gbit_s`` and ``gbytes_s``), because the sources differ: NVLink and PCIe are quoted
    in GB/s, networks in Gbit/s, and a reader should never have to guess which.
    - ``nvlink``: from DeviceSample.nvlinks (peer resolved by UUID, else by PCI bus id on the
      same node); ``links`` counts the lanes, the speed sums what the agent reported per lane.
    - ``pcie``: every other pair of devices on one host, through the host's PCIe fabric, at the
      slower device's negotiated generation x width when the agent reported it.
    - ``network``: from NodeHeartbeat.links (NetLink.gbps is Gbit/s); when both ends report a
      link the slower speed and the higher latency win, since that is what a hop will see.
    """
    devs = sorted(devices, key=lambda d: (str(d["node"]), int(d["index"])))
    node_list = node_summaries(nodes, devs)
    by_uuid = {str(d["uuid"]): str(d["id"]) for d in devs}
    by_bus = {
        (str(d["node"]), _norm_bus_id(str(d["pci_bus_id"]))): str(d["id"])
        for d in devs
        if d.get("pci_bus_id")
    }
    node_of = {str(d["id"]): str(d["node"]) for d in devs}

    # (a, b) -> reporter -> (lanes, gbps)
    nv: dict[tuple[str, str], dict[str, tuple[int, float]]] = {}
    for d in devs:
        me = str(d["id"])
        for link in d.get("nvlinks") or ():
            peer: str | None = None
            if link.get("peer_uuid"):
                peer = by_uuid.get(str(link["peer_uuid"]))
            if peer is None and link.get("peer_pci_bus_id"):
                peer = by_bus.get((str(d["node"]), _norm_bus_id(str(link["peer_pci_bus_id"]))))
            if peer is None or peer == me:
                continue  # an NVSwitch port or a peer we have not seen (yet)
            a, b = min(me, peer), max(me, peer)
            lanes, gbps = nv.setdefault((a, b), {}).get(me, (0, 0.0))
            nv[(a, b)][me] = (lanes + 1, gbps + float(link.get("gbps") or 0.0))

    links: list[View] = []
    for (a, b), reports in sorted(nv.items()):
        lanes = max(r[0] for r in reports.values())
        gbytes = max(r[1] for r in reports.values())
        links.append(
            _link(
                "nvlink",
                a,
                b,
                node_of[a] if node_of[a] == node_of[b] else None,
                lanes,
                gbytes or None,
            )
        )

    dev_by_id = {str(d["id"]): d for d in devs}
    for node in node_list:
        ids = [str(i) for i in node["devices"]]
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                pa, pb = min(a, b), max(a, b)
                if (pa, pb) in nv:
                    continue
                speeds = [s for s in (_pcie_gbytes(dev_by_id[a]), _pcie_gbytes(dev_by_id[b])) if s]
                links.append(
                    _link("pcie", pa, pb, str(node["id"]), 1, min(speeds) if speeds else None)
                )

    known = {str(n["id"]) for n in node_list}
    net: dict[tuple[str, str], View] = {}
    for node in node_list:
        for link in node.get("links") or ():
            me, peer = str(node["id"]), str(link["peer"])
            if peer == me:
                continue
            a, b = min(me, peer), max(me, peer)
            gbit, latency = float(link.get("gbps") or 0.0), float(link.get("latency_ms") or 0.0)
            seen = net.get((a, b))
            if seen is not None:
                gbit = min(float(seen["gbit_s"]), gbit)
                latency = max(float(seen["latency_ms"]), latency)
            net[(a, b)] = _link("network", a, b, None, 1, gbit / 8.0, latency)
            net[(a, b)]["peer_known"] = a in known and b in known
    links.extend(net[k] for k in sorted(net))

    topo_nodes = [
        {
            "id": n["id"],
            "hostname": n.get("hostname", ""),
            "status": n["status"],
            "online": n["online"],
            "interconnect": n.get("interconnect"),
            "devices": n["devices"],
        }
        for n in node_list
    ]
    topo_devices = [
        {
            "id": d["id"],
            "node": d["node"],
            "index": d["index"],
            "name": d.get("name"),
            "uuid": d["uuid"],
            "vendor": d.get("vendor"),
            "pci_bus_id": d.get("pci_bus_id"),
            "memory_total_bytes": d.get("memory_total_bytes"),
            "bandwidth_gbps": d.get("bandwidth_gbps"),
            "pcie_gen": d.get("pcie_gen"),
            "pcie_width": d.get("pcie_width"),
            "status": d["status"],
            "online": d["online"],
        }
        for d in devs
    ]
    counts = {"nvlink": 0, "pcie": 0, "network": 0}
    for link in links:
        counts[str(link["kind"])] += 1
    return {"nodes": topo_nodes, "devices": topo_devices, "links": links, "counts": counts}


def topology_signature(state: DeviceState) -> tuple[Any, ...]:
    """What of a device the topology shows: a new sample with only new figures (utilisation,
    temperature) leaves it unchanged, so the topology is rebuilt only when this changes.
    Read from the message itself: at thousands of samples a second no view dict is built."""
    s = state.sample
    return (
        s.name,
        s.uuid,
        s.vendor,
        s.pci_bus_id,
        s.memory_total_bytes,
        s.bandwidth_gbps,
        s.pcie_gen,
        s.pcie_width,
        _status(state),
        # As a tuple of tuples of plain values, which the cycle collector leaves alone.
        tuple((n.link, n.peer_uuid, n.peer_pci_bus_id, n.gbps) for n in s.nvlinks),
    )
