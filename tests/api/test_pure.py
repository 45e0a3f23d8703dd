"""The pure parts of the API: views, topology, metrics text, error fields. No I/O."""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from typing import Any, get_args

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardplane.api import metrics, openapi
from shardplane.api.body import Joined
from shardplane.api.errors import field_of
from shardplane.api.server import ERROR_STATUS
from shardplane.api.state import ClusterCache
from shardplane.api.views import (
    build_topology,
    device_brief,
    device_json,
    device_view,
    instance_view,
)
from shardplane.bus import codec
from shardplane.bus.messages import DeviceState, ErrorCode
from tests.api.fleet import FLEET, NODES, device_state, instance_state, node_state


def with_sample(state: DeviceState, **fields: Any) -> DeviceState:
    return msgspec.structs.replace(state, sample=msgspec.structs.replace(state.sample, **fields))


def dev(node: str, index: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": f"{node}/{index}",
        "node": node,
        "index": index,
        "uuid": f"GPU-{node}-{index}",
        "status": "online",
        "online": True,
        "last_seen": 1.0,
        "nvlinks": [],
    }
    base.update(extra)
    return base


def test_nvlink_peers_resolve_by_pci_bus_id_and_count_lanes_once() -> None:
    a = dev(
        "box",
        0,
        pci_bus_id="00000000:3B:00.0",
        nvlinks=[{"link": i, "peer_pci_bus_id": "0000:5e:00.0", "gbps": 25.0} for i in range(4)],
    )
    b = dev(
        "box",
        1,
        pci_bus_id="00000000:5E:00.0",
        nvlinks=[{"link": i, "peer_uuid": "GPU-box-0", "gbps": 25.0} for i in range(4)],
    )
    c = dev("box", 2, pcie_gen=5, pcie_width=16)
    switch = dev("box", 3, nvlinks=[{"link": 0, "peer_pci_bus_id": "0000:ff:00.0"}])
    topo = build_topology([], [c, b, a, switch])
    kinds = [(link["kind"], link["a"], link["b"]) for link in topo["links"]]
    assert kinds.count(("nvlink", "box/0", "box/1")) == 1
    nv = topo["links"][0]
    assert (nv["links"], nv["gbytes_s"], nv["gbit_s"]) == (4, 100.0, 800.0)
    # Every other pair on the host is PCIe; an unknown NVLink peer (an NVSwitch) draws nothing.
    assert sorted(k for k in kinds if k[0] == "pcie") == [
        ("pcie", "box/0", "box/2"),
        ("pcie", "box/0", "box/3"),
        ("pcie", "box/1", "box/2"),
        ("pcie", "box/1", "box/3"),
        ("pcie", "box/2", "box/3"),
    ]
    # A node with devices but no heartbeat still appears.
    assert topo["nodes"] == [
        {
            "id": "box",
            "hostname": "",
            "status": "online",
            "online": True,
            "interconnect": None,
            "devices": ["box/0", "box/1", "box/2", "box/3"],
        }
    ]


def test_network_links_listed_once_slowest_speed_highest_latency() -> None:
    nodes = [
        {
            "id": "a",
            "status": "online",
            "online": True,
            "links": [{"peer": "b", "gbps": 100.0, "latency_ms": 0.1}],
        },
        {
            "id": "b",
            "status": "online",
            "online": True,
            "links": [
                {"peer": "a", "gbps": 40.0, "latency_ms": 0.05},
                {"peer": "ghost", "gbps": 1.0},
            ],
        },
    ]
    topo = build_topology(nodes, [])
    net = [link for link in topo["links"] if link["kind"] == "network"]
    assert [(n["a"], n["b"], n["gbit_s"], n["latency_ms"], n["peer_known"]) for n in net] == [
        ("a", "b", 40.0, 0.1, True),
        ("b", "ghost", 1.0, 0.0, False),
    ]


def test_device_view_flattens_and_marks_lost_devices_offline() -> None:
    lost = with_sample(device_state(FLEET[0]), present=False)
    view = device_view(lost, revision=7)
    assert (view["id"], view["status"], view["offline_reason"], view["revision"]) == (
        "rig-a/0",
        "offline",
        "device lost",
        7,
    )
    assert "sample" not in view and view["temperature_c"] == 45.0


def test_device_json_is_the_view_encoded() -> None:
    """The fast encoding (the sample's own JSON, spliced) is byte for byte the view's, even
    with a string before ``v`` that spells ``,"v":`` (JSON escapes its quotes)."""
    online = device_state(FLEET[5])  # AMD, with NVLink-like peers
    silent = device_state(FLEET[0], online=False)
    lost = with_sample(
        device_state(FLEET[1]), present=False, uuid='GPU-x","v":9,"y', pci_bus_id=None
    )
    for state in (online, silent, lost):
        assert device_json(state, 42) == msgspec.json.encode(device_view(state, 42))
    assert msgspec.json.decode(device_json(lost, 3))["offline_reason"] == "device lost"


def _scrape(*states: DeviceState, host_label: str = "hostname") -> dict[str, Any]:
    book = metrics.MetricsBook(host_label)
    for state in states:
        brief = device_brief(state)
        held = metrics.device_labels(brief, None, host_label)
        book.device.set(f"devices.{brief.node}.{brief.gpu}", metrics.device_lines(brief, held))
    text = book.render(lambda: b"").decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_text_escapes_labels_and_parses() -> None:
    state = with_sample(
        device_state(FLEET[0]),
        name='GPU "quoted" \\ back\nslash',
        utilization_gpu_pct=12.5,
        memory_used_bytes=3 * 1024**2,
        temperature_c=None,
        driver_version="550.54.15",
    )
    families = _scrape(state)
    util = families["DCGM_FI_DEV_GPU_UTIL"].samples[0]
    assert util.value == 12.5 and util.labels["modelName"] == 'GPU "quoted" \\ back\nslash'
    assert util.labels["device"] == "nvidia0" and util.labels["hostname"] == "rig-a"
    assert util.labels["DCGM_FI_DRIVER_VERSION"] == "550.54.15"
    assert families["DCGM_FI_DEV_FB_USED"].samples[0].value == 3
    assert "DCGM_FI_DEV_GPU_TEMP" not in families or not families["DCGM_FI_DEV_GPU_TEMP"].samples
    up = families["shardplane_device_up"].samples[0]
    assert (up.labels["node"], up.labels["device_id"], up.value) == ("rig-a", "rig-a/0", 1)
    assert (
        metrics.number(float("nan")) == "NaN"
        and metrics.number(3.0) == "3"
        and metrics.number(0.25) == "0.25"
        and metrics.number(7) == "7"
    )


# Every DCGM default counter the NVML backend fills, each with a value of its own.
DCGM_COUNTERS: dict[str, object] = {
    "driver_version": "550.54.15",
    "memory_reserved_bytes": 512 * 1024**2,
    "memory_temperature_c": 61.0,
    "energy_mj": 123_456,
    "utilization_encoder_pct": 7.0,
    "utilization_decoder_pct": 11.0,
    "pcie_replay_count": 3,
    "pcie_tx_bytes_per_s": 1e6,
    "pcie_rx_bytes_per_s": 2.5e5,
    "xid_last": 79,
    "remapped_rows_correctable": 2,
    "remapped_rows_uncorrectable": 1,
    "row_remap_failed": True,
}


def test_every_filled_dcgm_default_counter_has_its_line_in_dcgm_units() -> None:
    state = with_sample(device_state(FLEET[0]), **DCGM_COUNTERS)
    families = _scrape(state)
    value = {name: families[name].samples[0].value for name in families if families[name].samples}
    assert set(value) == {f.name for f in metrics.DCGM_FAMILIES} | {"shardplane_device_up"}
    assert value["DCGM_FI_DEV_FB_RESERVED"] == 512  # MiB
    assert value["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == 123_456  # mJ, as DCGM
    assert families["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].type == "counter"
    assert (value["DCGM_FI_DEV_XID_ERRORS"], value["DCGM_FI_DEV_ROW_REMAP_FAILURE"]) == (79, 1)
    assert value["DCGM_FI_PROF_PCIE_TX_BYTES"] == 1e6
    # The 26 default counters: 20 series filled, one label, five left out with a reason.
    assert len(metrics.DCGM_FAMILIES) + 1 + len(metrics.DCGM_NOT_FILLED) == 26
    assert not {f.name for f in metrics.DCGM_FAMILIES} & set(metrics.DCGM_NOT_FILLED)


def test_amd_devices_use_amd_exporter_names_never_dcgm() -> None:
    amd = with_sample(device_state(FLEET[5]), energy_mj=5, driver_version="6.8.5")
    # A simulated device takes its simulated part's vendor.
    sim = with_sample(device_state(FLEET[6]), vendor="sim")
    families = _scrape(amd, sim)
    assert not any(name.startswith("DCGM_") and families[name].samples for name in families)
    used = {s.labels["gpu_id"]: s for s in families["gpu_used_vram"].samples}
    assert set(used) == {"0", "1"}
    assert used["0"].value == 2 * 1024  # MB of 2^20 bytes, as amd-smi counts them
    assert used["0"].labels == {
        "gpu_id": "0",
        "gpu_uuid": "GPU-rig-d-00-0000-4000-8000",
        "card_model": "AMD Instinct MI250X",
        "hostname": "rig-d",
        "driver_version": "6.8.5",
    }
    assert families["gpu_energy_consumed"].samples[0].value == 5000  # uJ
    clocks = {
        (s.labels["gpu_id"], s.labels["clock_type"]): s.value for s in families["gpu_clock"].samples
    }
    assert clocks[("0", "system")] == 1410.0 and clocks[("1", "memory")] == 1215.0
    assert families["pcie_speed"].samples[0].value == 16.0  # gen 4, GT/s


def test_offline_devices_keep_only_their_up_series() -> None:
    online = device_state(FLEET[0])
    silent = device_state(FLEET[1], online=False)
    lost = with_sample(device_state(FLEET[5]), present=False)
    families = _scrape(online, silent, lost)
    up = {s.labels["UUID"]: s.value for s in families["shardplane_device_up"].samples}
    assert sorted(up.values()) == [0, 0, 1] and len(up) == 3
    for name, family in families.items():
        if name != "shardplane_device_up":
            assert [s.labels.get("UUID", s.labels.get("gpu_uuid")) for s in family.samples] in (
                [],
                [online.sample.uuid],
            ), name


def test_host_label_spelling_is_a_setting() -> None:
    assert metrics.host_label_from_env({}) == "hostname"
    assert metrics.host_label_from_env({metrics.HOSTNAME_LABEL_ENV: "Hostname"}) == "Hostname"
    with pytest.raises(ValueError, match="HOSTNAME_LABEL='host': must be one of"):
        metrics.host_label_from_env({metrics.HOSTNAME_LABEL_ENV: "host"})
    families = _scrape(device_state(FLEET[0]), host_label="Hostname")
    util = families["DCGM_FI_DEV_GPU_UTIL"].samples[0]
    assert util.labels["Hostname"] == "rig-a" and "hostname" not in util.labels


def test_metric_families_rebuild_only_where_a_line_changed() -> None:
    book = metrics.LineBook(metrics.DEVICE_FAMILIES)
    briefs = [device_brief(device_state(gpu)) for gpu in FLEET[:2]]
    for i, brief in enumerate(briefs):
        book.set(f"d{i}", metrics.device_lines(brief, metrics.device_labels(brief, None)))
    before = dict(zip(metrics.DEVICE_FAMILIES, book.blocks(), strict=True))
    version = book.version
    hotter = msgspec.structs.replace(briefs[0], temperature_c=91.0)
    book.set("d0", metrics.device_lines(hotter, metrics.device_labels(hotter, None)))
    assert book.version == version + 1  # one line changed, in one family
    after = dict(zip(metrics.DEVICE_FAMILIES, book.blocks(), strict=True))
    changed = [f.name for f in metrics.DEVICE_FAMILIES if after[f] is not before[f]]
    assert changed == ["DCGM_FI_DEV_GPU_TEMP"]  # the others' blocks are the same objects
    temp = next(f for f in metrics.DEVICE_FAMILIES if f.name == "DCGM_FI_DEV_GPU_TEMP")
    assert b'DCGM_FI_DEV_GPU_TEMP{gpu="0"' in after[temp]
    assert b" 91\n" in after[temp]
    book.drop("d1")
    assert all(b'UUID="GPU-rig-b-00' not in block for block in book.blocks())


def test_instance_metrics_one_line_per_stage_and_state() -> None:
    view = instance_view(instance_state(), 3)
    lines = metrics.instance_lines(view)
    assert set(lines) == {f.name for f in metrics.INSTANCE_FAMILIES}
    # instance_id, never instance (Prometheus would rename it to exported_instance).
    assert b'instance_id="llama-demo"' in lines["shardplane_stage_layers"]
    assert b"instance=" not in b"".join(lines.values())
    assert b'device_id="rig-d/0"' in lines["shardplane_stage_layers"]
    states = lines["shardplane_stage_state"].split(b"\n")
    assert len(states) == 2 * len(metrics.STAGE_STATES)
    assert sum(line.endswith(b" 1") for line in states) == 2
    assert lines["shardplane_stage_layers"].split(b"\n")[1].endswith(b" 30")
    text = metrics.summary_lines({"online": 2}, {"offline": 1}, {"loading": 1}).decode()
    counts = {(f.name, s.value) for f in text_string_to_metric_families(text) for s in f.samples}
    assert counts == {
        ("shardplane_devices", 2),
        ("shardplane_nodes", 1),
        ("shardplane_instances", 1),
    }


def test_cache_is_idempotent_on_revision_and_skips_bad_values() -> None:
    cache = ClusterCache()
    raw = codec.encode(device_state(FLEET[0]))
    assert cache.apply("devices.rig-a.0", raw, 5) is not None
    assert cache.apply("devices.rig-a.0", raw, 5) is None  # a redelivery
    assert cache.apply("devices.rig-a.0", raw, 4) is None  # an older one
    assert cache.apply("devices.rig-a.1", b"\x01garbage", 6) is None
    assert cache.invalid == 1 and len(cache.briefs) == 1
    assert cache.apply("nodes.rig-a", codec.encode(node_state("rig-a")), 7) is not None
    assert b'hostname="rig-a.lab"' in cache.metrics_body()  # a heartbeat relabels the devices
    # A fresh watch's replay is the truth, even at lower revisions (a recreated bucket).
    assert cache.apply("devices.rig-a.0", raw, 5, replay=True) is None  # the same entry
    assert cache.apply("devices.rig-a.0", raw, 2, replay=True) is not None
    assert cache.revisions["devices.rig-a.0"] == 2
    gone = cache.apply("devices.rig-a.0", None, 8, deleted=True)
    assert gone is not None and gone.op == "delete" and b'"value":null' in gone.event()
    assert bytes(cache.devices_body()).startswith(b'{"count":0,')


def test_every_error_code_has_an_http_status() -> None:
    """A code added to the bus contract cannot reach a client as an unplanned 500."""
    assert set(ERROR_STATUS) == set(get_args(ErrorCode))
    assert ERROR_STATUS["unavailable"] == 503 and ERROR_STATUS["insufficient_memory"] == 409
    # ... and the OpenAPI document says so, status by status.
    place = openapi.document()["paths"]["/api/placements"]["post"]["responses"]
    for code, status in ERROR_STATUS.items():
        assert code in place[str(status)]["description"], (code, status)


def test_list_bodies_rebuilt_at_most_every_max_age() -> None:
    """Under constant change a list is rebuilt at most every max_age_s (it may lag that long);
    a list whose entries did not change is served as built, at any age."""
    held = ClusterCache(max_age_s=3600.0)
    fresh = ClusterCache(max_age_s=0.0)
    for cache in (held, fresh):
        cache.apply("devices.rig-a.0", codec.encode(device_state(FLEET[0])), 1)
        cache.devices_body()
        cache.apply("devices.rig-a.0", codec.encode(device_state(FLEET[0], seq=2)), 2)
    assert bytes(held.devices_body()).startswith(b'{"count":1,"revision":1,')  # within max age
    assert bytes(fresh.devices_body()).startswith(b'{"count":1,"revision":2,')
    assert fresh.devices_body() is fresh.devices_body()  # unchanged: not joined again


def test_list_body_is_a_snapshot_sent_in_slices() -> None:
    """The device list is taken as a snapshot of the entries' JSON and joined slice by slice
    as it is sent: the slices make exactly the joined body, of the declared length, and a
    change applied while it is being sent does not alter it."""
    cache = ClusterCache(max_age_s=0.0)
    for n, gpu in enumerate(FLEET):
        cache.apply(f"devices.{gpu.node}.{gpu.index}", codec.encode(device_state(gpu)), n + 1)
    body = cache.devices_body()
    assert isinstance(body, Joined)
    whole = bytes(body)
    assert len(body) == len(whole) and msgspec.json.decode(whole)["count"] == len(FLEET)
    entry = max(map(len, body.parts)) + 1  # an entry and its separator
    for limit in (1, 100, 700, len(whole), 10 * len(whole)):
        pieces = list(body.slices(limit))
        assert b"".join(pieces) == whole, limit
        assert all(len(p) < limit + entry + len(body.head) for p in pieces), limit
    changed = device_state(FLEET[0], seq=2, utilization_gpu_pct=99.0)
    cache.apply(f"devices.{FLEET[0].node}.0", codec.encode(changed), 100)
    assert bytes(body) == whole  # the snapshot held
    assert bytes(cache.devices_body()) != whole and b'"revision":100' in bytes(cache.devices_body())
    empty = Joined(b"[", [], b"]")
    assert (bytes(empty), len(empty), b"".join(empty.slices(4))) == (b"[]", 2, b"[]")


def test_expire_marks_only_devices_past_their_ttl() -> None:
    """The liveness pass judges each device on the API's clock by its node's interval: a
    device past its TTL is shown offline (stale); a younger one, and one already offline,
    are left alone."""
    cache = ClusterCache()
    now = time.time()
    for rev, node in enumerate(NODES, 1):
        cache.apply(f"nodes.{node}", codec.encode(node_state(node)), rev)
    ages = {("rig-a", 0): 1.0, ("rig-b", 0): 3600.0, ("rig-b", 1): 3600.0}
    for rev, gpu in enumerate(FLEET, 100):
        age = ages.get((gpu.node, gpu.index), 0.0)
        online = (gpu.node, gpu.index) != ("rig-b", 1)
        state = msgspec.structs.replace(device_state(gpu, online=online), last_seen=now - age)
        cache.apply(f"devices.{gpu.node}.{gpu.index}", codec.encode(state), rev)
    changes = cache.expire(now)
    assert {c.key for c in changes} == {"devices.rig-b.0"}
    assert cache.briefs["devices.rig-b.0"].online is False
    assert b"no update for 3600s" in cache.json["device"]["devices.rig-b.0"]
    assert cache.briefs["devices.rig-a.0"].online is True
    assert cache.expire(now) == []  # judged once: nothing shown online is past its TTL now


def test_devices_add_next_to_nothing_for_the_cycle_collector() -> None:
    """At 8,000 devices each replaced every interval, whatever the cache keeps per device and
    the cycle collector tracks is walked by every full collection, on the event loop: a
    device's brief and its value as written are plain (untracked), so a device costs the
    collector about one object (its chart ring), however often it changes."""
    cache = ClusterCache()
    gpu = FLEET[0]
    cache.apply("devices.rig-a.0", codec.encode(device_state(gpu)), 1)
    gc.collect()
    base = len(gc.get_objects())
    count = 200
    for seq in (1, 2, 3):
        for n in range(count):
            state = device_state(replace(gpu, node=f"n{n:03d}"), seq=seq)
            cache.apply(f"devices.n{n:03d}.0", codec.encode(state), seq * 1000 + n)
    gc.collect()
    per_device = (len(gc.get_objects()) - base) / count
    assert len(cache.briefs) == count + 1 and per_device < 2.5, per_device
    assert not gc.is_tracked(cache.briefs["devices.n000.0"])


def test_error_fields() -> None:
    assert field_of("Expected `int`, got `str` - at `$.batch`") == "batch"
    assert field_of("Object contains unknown field `contxt`") == "contxt"
    assert field_of("Object contains unknown field `foo` - at `$.model`") == "model.foo"
    assert (
        field_of("Expected `str` matching regex 'x' - at `$.exclude_nodes[0]`")
        == "exclude_nodes[0]"
    )
    assert field_of("Expected `object`, got `array`") is None
