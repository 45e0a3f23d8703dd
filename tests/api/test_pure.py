"""The pure parts of the API: views, topology, metrics text, error fields. No I/O."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from api import metrics
from api.errors import field_of
from api.state import ClusterCache
from api.views import build_topology, device_view
from bus import codec
from tests.api.fleet import FLEET, device_state, node_state


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
    lost = device_state(FLEET[0])
    lost = type(lost)(
        sample=type(lost.sample)(**{**codec.to_builtins(lost.sample), "present": False}),
        online=True,
        last_seen=1.0,
    )
    view = device_view(lost, revision=7)
    assert (view["id"], view["status"], view["offline_reason"], view["revision"]) == (
        "rig-a/0",
        "offline",
        "device lost",
        7,
    )
    assert "sample" not in view and view["temperature_c"] == 45.0


def test_metrics_text_escapes_labels_and_parses() -> None:
    view = dict(
        dev(
            "n",
            0,
            name='GPU "quoted" \\ back\nslash',
            utilization_gpu_pct=12.5,
            memory_used_bytes=3 * 1024**2,
            vendor="amd",
        )
    )
    dcgm, own = metrics.device_labels(view, None)
    book = metrics.MetricsBook()
    book.set_device("devices.n.0", metrics.device_lines(view, dcgm, own))
    text = book.render(lambda: "").decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    util = families["DCGM_FI_DEV_GPU_UTIL"].samples[0]
    assert util.value == 12.5 and util.labels["modelName"] == 'GPU "quoted" \\ back\nslash'
    assert util.labels["device"] == "amd0" and util.labels["Hostname"] == "n"
    assert families["DCGM_FI_DEV_FB_USED"].samples[0].value == 3
    assert "DCGM_FI_DEV_GPU_TEMP" not in families or not families["DCGM_FI_DEV_GPU_TEMP"].samples
    assert (
        metrics.number(float("nan")) == "NaN"
        and metrics.number(3.0) == "3"
        and metrics.number(0.25) == "0.25"
    )


def test_cache_is_idempotent_on_revision_and_skips_bad_values() -> None:
    cache = ClusterCache()
    raw = codec.encode(device_state(FLEET[0]))
    assert cache.apply("devices.rig-a.0", raw, 5) is not None
    assert cache.apply("devices.rig-a.0", raw, 5) is None  # a redelivery
    assert cache.apply("devices.rig-a.0", raw, 4) is None  # an older one
    assert cache.apply("devices.rig-a.1", b"\x01garbage", 6) is None
    assert cache.invalid == 1 and len(cache.briefs) == 1
    assert cache.apply("nodes.rig-a", codec.encode(node_state("rig-a")), 7) is not None
    assert b'Hostname="rig-a.lab"' in cache.metrics_body()  # a heartbeat relabels the devices
    # A fresh watch's replay is the truth, even at lower revisions (a recreated bucket).
    assert cache.apply("devices.rig-a.0", raw, 5, replay=True) is None  # the same entry
    assert cache.apply("devices.rig-a.0", raw, 2, replay=True) is not None
    assert cache.revisions["devices.rig-a.0"] == 2
    gone = cache.apply("devices.rig-a.0", None, 8, deleted=True)
    assert gone is not None and gone.op == "delete" and b'"value":null' in gone.event()
    assert cache.devices_body().startswith(b'{"count":0,')


def test_error_fields() -> None:
    assert field_of("Expected `int`, got `str` - at `$.batch`") == "batch"
    assert field_of("Object contains unknown field `contxt`") == "contxt"
    assert field_of("Object contains unknown field `foo` - at `$.model`") == "model.foo"
    assert (
        field_of("Expected `str` matching regex 'x' - at `$.exclude_nodes[0]`")
        == "exclude_nodes[0]"
    )
    assert field_of("Expected `object`, got `array`") is None
