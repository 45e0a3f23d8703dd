"""The status API against a real NATS server: the simulated fleet is written into the real
``cluster_state`` bucket, the API watches it, and every endpoint is read over real HTTP."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any, get_args

import aiohttp
import msgspec
import pytest
from jsonschema import Draft202012Validator, ValidationError
from nats.aio.client import Client
from nats.js.kv import KeyValue
from prometheus_client.parser import text_string_to_metric_families

from shardplane.api.server import LARGE_BODY, make_app, start_app
from shardplane.bus import codec, keys
from shardplane.bus.messages import ErrorCode, PlacementReply
from tests.api.fleet import FLEET, GIB, Gpu, instance_state, put_device, uuid_of
from tests.kit import eventually

AGENT_INTERVAL_S = 2.0  # the simulated agents' default sample interval
EVENT_WAIT_S = 30.0  # how long a test waits for an event whose timing it does not assert


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as r:
        body = await r.read()
        return r.status, json.loads(body)


async def post(http: aiohttp.ClientSession, url: str, data: bytes | str) -> tuple[int, Any]:
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, json.loads(await r.read())


# --- reads ----------------------------------------------------------------------------------


async def test_devices_every_device_with_figures(api_url: str, http: aiohttp.ClientSession) -> None:
    status, body = await get(http, api_url + "/api/gpu/devices")
    assert status == 200
    assert body["count"] == len(FLEET) == len(body["devices"])
    ids = [d["id"] for d in body["devices"]]
    assert ids == sorted(ids, key=lambda i: (i.split("/")[0], int(i.split("/")[1])))
    a100 = body["devices"][0]
    assert a100["id"] == "rig-a/0" and a100["node"] == "rig-a" and a100["index"] == 0
    assert a100["uuid"] == uuid_of(FLEET[0])
    assert a100["name"] == "NVIDIA A100-SXM4-80GB"
    assert a100["status"] == "online" and a100["online"] is True
    assert a100["memory_total_bytes"] == 80 * GIB
    assert a100["memory_used_bytes"] == 2 * GIB
    assert a100["utilization_gpu_pct"] == 10.0
    assert a100["temperature_c"] == 45.0
    assert a100["power_w"] == 120.5
    assert a100["pci_bus_id"] == "00000000:3B:00.0"
    assert a100["last_seen"] > time.time() - 60
    assert a100["revision"] > 0
    # The original design's names, next to the rest, so a client written against it works.
    assert (a100["device_id"], a100["node_id"]) == ("rig-a/0", "rig-a")
    assert (a100["memory_used_mb"], a100["memory_total_mb"]) == (2 * 1024, 80 * 1024)  # MiB
    assert a100["utilization_percent"] == 10.0 and a100["temperature_c"] == 45.0
    # Every device is what the OpenAPI document says a DeviceView is, those names included.
    _, doc = await get(http, api_url + "/api/openapi.json")
    view = doc["components"]["schemas"]["DeviceView"]
    assert {"device_id", "node_id", "memory_used_mb", "utilization_percent"} <= set(
        view["allOf"][1]["required"]
    )
    validator = Draft202012Validator(
        {"$ref": "#/components/schemas/DeviceView", "components": doc["components"]}
    )
    for device in body["devices"]:
        validator.validate(device)
    with pytest.raises(ValidationError, match="memory_used_mb"):
        validator.validate({k: v for k, v in a100.items() if k != "memory_used_mb"})

    status, body = await get(http, api_url + "/api/gpu/devices?node=rig-b")
    assert (status, [d["id"] for d in body["devices"]]) == (200, ["rig-b/0", "rig-b/1"])
    status, body = await get(http, api_url + "/api/gpu/devices?status=offline")
    assert (status, body["count"]) == (200, 0)
    status, body = await get(http, api_url + "/api/gpu/devices/rig-c/1")
    assert (status, body["name"]) == (200, "Tesla P40")


async def test_large_bodies_stream_whole_and_head_has_none(
    api_url: str, http: aiohttp.ClientSession, fleet_kv: KeyValue
) -> None:
    """A big fleet's lists and scrape go out in slices (over LARGE_BODY): whole, parseable,
    keep-alive intact, and a HEAD answer has the length but no body."""
    big = [
        Gpu(f"big-{n:03d}", i, "NVIDIA H100", "nvidia", 80, 3350.0, f"0000:{i:02x}:00.0")
        for n in range(60)
        for i in range(8)
    ]
    await asyncio.gather(*(put_device(fleet_kv, gpu) for gpu in big))
    want = len(FLEET) + len(big)

    async def all_there() -> None:
        _, body = await get(http, api_url + "/api/gpu/devices")
        assert body["count"] == want == len(body["devices"])

    await eventually(all_there, timeout=30.0)
    async with http.get(api_url + "/api/gpu/devices") as r:
        raw = await r.read()
    assert len(raw) > LARGE_BODY and int(r.headers["Content-Length"]) == len(raw)
    assert json.loads(raw)["devices"][-1]["id"] == "rig-d/1"
    async with http.head(api_url + "/api/gpu/devices") as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(raw)
        assert await r.read() == b""

    async def scraped() -> None:
        async with http.get(api_url + "/metrics") as r:
            text = await r.text()
        assert len(text) > LARGE_BODY
        util = next(
            f for f in text_string_to_metric_families(text) if f.name == "DCGM_FI_DEV_GPU_UTIL"
        )
        assert len(util.samples) == want - sum(g.vendor == "amd" for g in FLEET)  # DCGM: NVIDIA

    await eventually(scraped, timeout=30.0)


async def test_device_goes_offline(
    api_url: str, http: aiohttp.ClientSession, fleet_kv: KeyValue
) -> None:
    await put_device(fleet_kv, FLEET[2], online=False, seq=2)

    async def offline() -> None:
        _, body = await get(http, api_url + "/api/gpu/devices?status=offline")
        assert [d["id"] for d in body["devices"]] == ["rig-b/1"]
        assert body["devices"][0]["offline_reason"] == "silent"

    await eventually(offline)

    async def gauges_dropped() -> None:
        # Its last figures are not current: only its up series (0) is left.
        async with http.get(api_url + "/metrics") as r:
            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        gone = uuid_of(FLEET[2])
        up = {s.labels["UUID"]: s.value for s in families["shardplane_device_up"].samples}
        assert up[gone] == 0 and up[uuid_of(FLEET[1])] == 1
        for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_TEMP"):
            uuids = {s.labels["UUID"] for s in families[name].samples}
            assert gone not in uuids and uuid_of(FLEET[1]) in uuids, name

    await eventually(gauges_dropped)


async def test_topology_links(api_url: str, http: aiohttp.ClientSession) -> None:
    status, topo = await get(http, api_url + "/api/gpu/topology")
    assert status == 200
    assert [n["id"] for n in topo["nodes"]] == ["rig-a", "rig-b", "rig-c", "rig-d"]
    assert topo["nodes"][1]["devices"] == ["rig-b/0", "rig-b/1"]
    assert len(topo["devices"]) == len(FLEET)
    links = {(x["kind"], x["a"], x["b"]): x for x in topo["links"]}
    assert topo["counts"] == {"nvlink": 1, "pcie": 2, "network": 6}
    nv = links[("nvlink", "rig-d/0", "rig-d/1")]
    assert nv["links"] == 4 and nv["gbytes_s"] == 200.0 and nv["node"] == "rig-d"
    # PCIe gen 4 x16 on both 4090s; on rig-c the 3060's gen 4 x8 is slower than the P40's gen 3 x16.
    assert links[("pcie", "rig-b/0", "rig-b/1")]["gbytes_s"] == pytest.approx(1.969 * 16, abs=0.01)
    assert links[("pcie", "rig-c/0", "rig-c/1")]["gbytes_s"] == pytest.approx(1.969 * 8, abs=0.01)
    net = links[("network", "rig-a", "rig-d")]
    assert (net["gbit_s"], net["latency_ms"]) == (100.0, 0.01)
    # Reported by both ends: listed once.
    ab = [
        x
        for x in topo["links"]
        if x["kind"] == "network" and {x["a"], x["b"]} == {"rig-a", "rig-b"}
    ]
    assert len(ab) == 1 and ab[0]["gbit_s"] == 25.0 and ab[0]["latency_ms"] == 0.05


async def test_nodes(api_url: str, http: aiohttp.ClientSession) -> None:
    status, body = await get(http, api_url + "/api/nodes")
    assert status == 200 and body["count"] == 4
    rig_b = body["nodes"][1]
    assert rig_b["id"] == "rig-b" and rig_b["hostname"] == "rig-b.lab" and rig_b["online"] is True
    assert rig_b["devices"] == ["rig-b/0", "rig-b/1"] and rig_b["devices_online"] == 2
    assert rig_b["memory_total_bytes"] == 48 * GIB
    assert rig_b["memory_used_bytes"] == (2 + 3) * GIB
    assert rig_b["links"][0] == {"peer": "rig-a", "gbps": 25.0, "latency_ms": 0.05}


async def test_placements_list_and_by_id(
    api_url: str, http: aiohttp.ClientSession, fleet_kv: KeyValue
) -> None:
    status, body = await get(http, api_url + "/api/placements")
    assert (status, body["placements"]) == (200, [])
    await fleet_kv.put(keys.instance_key("llama-demo"), codec.encode(instance_state()))

    async def listed() -> None:
        _, body = await get(http, api_url + "/api/placements")
        assert [p["id"] for p in body["placements"]] == ["llama-demo"]

    await eventually(listed)
    status, inst = await get(http, api_url + "/api/placements/llama-demo")
    assert status == 200
    assert inst["model"] == "llama-3.1-70b" and inst["generation"] == 1
    assert inst["layers_total"] == 80 and inst["devices"] == ["rig-a/0", "rig-d/0"]
    assert [s["state"] for s in inst["stages"]] == ["loaded", "loading"]

    status, err = await get(http, api_url + "/api/placements/nothing-here")
    assert status == 404 and err["error"]["field"] == "id"
    status, err = await get(http, api_url + "/api/placements/Not%20An%20Id")
    assert status == 400 and err["error"]["field"] == "id"


async def test_health_ready_openapi(api_url: str, http: aiohttp.ClientSession) -> None:
    assert (await get(http, api_url + "/healthz"))[0] == 200
    status, ready = await get(http, api_url + "/readyz")
    assert status == 200 and ready["ready"] is True and ready["devices"] == len(FLEET)
    status, doc = await get(http, api_url + "/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for path in (
        "/api/gpu/devices",
        "/api/gpu/topology",
        "/api/nodes",
        "/api/placements",
        "/api/placements/{id}",
        "/api/events",
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/openapi.json",
    ):
        assert path in doc["paths"], path
    assert "post" in doc["paths"]["/api/placements"]
    assert "PlacementRequest" in doc["components"]["schemas"]
    # Every code the API answers with is a documented value, the planner's and its own.
    codes = doc["components"]["schemas"]["ApiError"]["properties"]["error"]["properties"]["code"]
    assert set(get_args(ErrorCode)) | {"not_found", "method_not_allowed"} == set(codes["enum"])
    place = doc["paths"]["/api/placements"]["post"]["responses"]
    assert {"400", "404", "409", "413", "503", "504"} <= set(place)
    assert "unavailable" in place["503"]["description"]
    assert "0.25 s" in doc["paths"]["/api/gpu/devices"]["get"]["description"]


async def test_readyz_not_ready_without_nats(
    nc: Client, fleet_kv: KeyValue, http: aiohttp.ClientSession
) -> None:
    import nats

    client = await nats.connect(nc.connected_url.geturl() if nc.connected_url else "")
    # A long request timeout, so answering before it shows the API did not wait for it.
    runner, url = await start_app(make_app(client, request_timeout_s=60.0))
    try:
        assert (await get(http, url + "/readyz"))[0] == 200
        await client.close()
        status, ready = await get(http, url + "/readyz")
        assert status == 503 and ready["ready"] is False
        assert "NATS is not connected" in ready["problems"]
        assert (await get(http, url + "/healthz"))[0] == 200  # alive, just not ready
        # A placement cannot reach any planner: 503 at once, not after the request timeout.
        started = time.monotonic()
        status, reply = await post(http, url + "/api/placements", '{"model": "llama-3.1-8b"}')
        assert (status, reply["error"]["code"]) == (503, "unavailable")
        assert "not connected to NATS" in reply["error"]["message"]
        took = time.monotonic() - started
        assert took < 10.0, f"503 after {took:.1f} s: waited for the 60 s request timeout?"
    finally:
        await runner.cleanup()


# --- metrics --------------------------------------------------------------------------------


async def test_metrics_parse_with_dcgm_names(
    api_url: str, http: aiohttp.ClientSession, fleet_kv: KeyValue
) -> None:
    await fleet_kv.put(keys.instance_key("llama-demo"), codec.encode(instance_state()))

    async def scrape() -> dict[str, Any]:
        async with http.get(api_url + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
        return {f.name: f for f in text_string_to_metric_families(text)}

    families: dict[str, Any] = {}

    async def has_instance() -> None:
        # Every family's HELP/TYPE head is rendered even with no lines, so wait for the
        # instance's own lines: the put's ack can come before the watch applies it, and a scrape
        # in between is served from a rendition without it until the next render.
        families.clear()
        families.update(await scrape())
        stages = families["shardplane_stage_state"].samples
        assert any(s.labels["instance_id"] == "llama-demo" for s in stages)

    await eventually(has_instance)
    nvidia = [g for g in FLEET if g.vendor == "nvidia"]
    for name in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_SM_CLOCK",
    ):
        assert len(families[name].samples) == len(nvidia), name
    for name in ("gpu_gfx_activity", "gpu_used_vram", "gpu_edge_temperature", "gpu_power_usage"):
        assert len(families[name].samples) == len(FLEET) - len(nvidia), name
    used = {s.labels["UUID"]: s for s in families["DCGM_FI_DEV_FB_USED"].samples}
    a100 = used[uuid_of(FLEET[0])]
    assert a100.value == 2 * 1024  # MiB, as the DCGM exporter reports framebuffer memory
    assert a100.labels == {
        "gpu": "0",
        "UUID": uuid_of(FLEET[0]),
        "pci_bus_id": "00000000:3B:00.0",
        "device": "nvidia0",
        "modelName": "NVIDIA A100-SXM4-80GB",
        "hostname": "rig-a.lab",
    }
    up = {s.labels["UUID"]: s for s in families["shardplane_device_up"].samples}[uuid_of(FLEET[0])]
    assert (up.value, up.labels["node"], up.labels["hostname"]) == (1, "rig-a", "rig-a.lab")
    free = {s.labels["UUID"]: s.value for s in families["DCGM_FI_DEV_FB_FREE"].samples}
    assert free[uuid_of(FLEET[0])] == 78 * 1024
    temps = {s.labels["UUID"]: s.value for s in families["DCGM_FI_DEV_GPU_TEMP"].samples}
    assert temps[uuid_of(FLEET[0])] == 45.0
    devices = {s.labels["status"]: s.value for s in families["shardplane_devices"].samples}
    assert devices == {"online": len(FLEET), "offline": 0}
    loaded = [
        s
        for s in families["shardplane_stage_state"].samples
        if s.value == 1 and s.labels["instance_id"] == "llama-demo"
    ]
    assert sorted((s.labels["stage"], s.labels["state"]) for s in loaded) == [
        ("0", "loaded"),
        ("1", "loading"),
    ]
    layers = {s.labels["stage"]: s.value for s in families["shardplane_stage_layers"].samples}
    assert layers == {"0": 50, "1": 30}


async def test_metrics_gzip_for_scrapers(api_url: str, http: aiohttp.ClientSession) -> None:
    """Prometheus asks for gzip; the same text comes back compressed (once per change)."""
    import gzip

    async with http.get(api_url + "/metrics", headers={"Accept-Encoding": "identity"}) as r:
        plain = await r.read()
        assert "Content-Encoding" not in r.headers
    async with http.get(
        api_url + "/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    ) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await r.read()) == plain


async def test_metrics_follow_changes(
    api_url: str, http: aiohttp.ClientSession, fleet_kv: KeyValue
) -> None:
    await put_device(fleet_kv, FLEET[0], seq=2, utilization_gpu_pct=77.0)

    async def changed() -> None:
        async with http.get(api_url + "/metrics") as r:
            text = await r.text()
        util = next(
            f for f in text_string_to_metric_families(text) if f.name == "DCGM_FI_DEV_GPU_UTIL"
        )
        assert {s.labels["UUID"]: s.value for s in util.samples}[uuid_of(FLEET[0])] == 77.0

    await eventually(changed)


# --- server-sent events ---------------------------------------------------------------------


async def next_event(resp: aiohttp.ClientResponse, timeout: float) -> tuple[str, dict[str, Any]]:
    kind, data = "", ""
    async with asyncio.timeout(timeout):
        while True:
            line = (await resp.content.readline()).decode()
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: "):
                data = line[6:].strip()
            elif line == "\n" and kind:
                return kind, json.loads(data)


async def test_sse_delivers_changes_promptly(
    api_url: str, http: aiohttp.ClientSession, fleet_kv: KeyValue
) -> None:
    stream_timeout = aiohttp.ClientTimeout(total=5 * EVENT_WAIT_S)  # all the waits below
    async with http.get(api_url + "/api/events", timeout=stream_timeout) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        kind, hello = await next_event(resp, EVENT_WAIT_S)
        assert kind == "hello" and hello["revision"] > 0

        # The requirement: a change reaches a client within one agent interval. Wait longer,
        # so a late event is reported with its latency rather than as a timeout.
        started = time.monotonic()
        await put_device(fleet_kv, FLEET[3], seq=9, temperature_c=71.0)
        kind, event = await next_event(resp, EVENT_WAIT_S)
        took = time.monotonic() - started
        assert took < AGENT_INTERVAL_S, f"the change took {took:.2f} s to reach the stream"
        assert (kind, event["op"], event["id"]) == ("device", "put", "rig-c/0")
        assert event["key"] == "devices.rig-c.0" and event["value"]["temperature_c"] == 71.0

        await fleet_kv.put(keys.instance_key("llama-demo"), codec.encode(instance_state()))
        kind, event = await next_event(resp, EVENT_WAIT_S)
        assert (kind, event["id"], event["value"]["layers_total"]) == ("instance", "llama-demo", 80)

        await fleet_kv.delete(keys.instance_key("llama-demo"))
        kind, event = await next_event(resp, EVENT_WAIT_S)
        assert (kind, event["op"], event["value"]) == ("instance", "delete", None)


async def test_sse_kinds_filter(
    api_url: str, http: aiohttp.ClientSession, fleet_kv: KeyValue
) -> None:
    async with http.get(api_url + "/api/events?kinds=instance") as resp:
        assert (await next_event(resp, EVENT_WAIT_S))[0] == "hello"
        await put_device(fleet_kv, FLEET[0], seq=5)
        await fleet_kv.put(keys.instance_key("llama-demo"), codec.encode(instance_state()))
        kind, event = await next_event(resp, EVENT_WAIT_S)
        assert (kind, event["id"]) == ("instance", "llama-demo")  # the device change was filtered
    status, err = await get(http, api_url + "/api/events?kinds=devices")
    assert status == 400 and err["error"]["field"] == "kinds"


# --- placements through the real planner ----------------------------------------------------


async def test_post_placement_end_to_end(
    api_url: str, http: aiohttp.ClientSession, planner: None
) -> None:
    status, reply = await post(
        http, api_url + "/api/placements", '{"model": "llama-3.1-8b", "dry_run": true}'
    )
    assert status == 200, reply
    assert reply["ok"] is True and reply["model"] == "llama-3.1-8b" and reply["dry_run"] is True
    stages = reply["stages"]
    assert stages[0]["layer_start"] == 0 and stages[-1]["layer_end"] == 32
    for before, after in itertools.pairwise(stages):
        assert before["layer_end"] == after["layer_start"]
    known = {f"{g.node}/{g.index}" for g in FLEET}
    assert all(s["device"] in known for s in stages)

    status, reply = await post(http, api_url + "/api/placements", '{"model": "no-such-model"}')
    assert status == 404 and reply["ok"] is False and reply["error"]["code"] == "unknown_model"

    # 405B parameters at 2 bytes each do not fit in this fleet's 292 GiB.
    status, reply = await post(http, api_url + "/api/placements", '{"model": "llama-3.1-405b"}')
    assert status in (409, 422) and reply["error"]["code"] in (
        "insufficient_memory",
        "no_devices",
    ), reply


async def test_delete_placement_releases_it_idempotently(
    api_url: str, http: aiohttp.ClientSession, planner: None
) -> None:
    status, placed = await post(
        http, api_url + "/api/placements", '{"model": "llama-3.1-8b", "instance_id": "del-me"}'
    )
    assert status == 200 and placed["ok"], placed
    async with http.delete(api_url + "/api/placements/del-me") as r:
        status, reply = r.status, await r.json()
    assert status == 200 and reply["ok"] and not reply["already"], reply
    assert reply["generation"] == 2 and reply["released_bytes"] > 0
    async with http.delete(api_url + "/api/placements/del-me") as r:
        status, reply = r.status, await r.json()
    assert status == 200 and reply["already"] is True, reply
    async with http.delete(api_url + "/api/placements/never-was") as r:
        status, reply = r.status, await r.json()
    assert status == 404 and reply["error"]["code"] == "not_found", reply
    async with http.delete(api_url + "/api/placements/Not%20An%20Id") as r:
        assert r.status == 400


async def test_post_placement_without_planner_is_503(
    api_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(api_url + "/api/placements", data='{"model": "llama-3.1-8b"}') as r:
        status, raw = r.status, await r.read()
    # The envelope and the code are the planner's own: a client decodes one type either way.
    reply = msgspec.json.decode(raw, type=PlacementReply)
    assert status == 503 and reply.error is not None and reply.error.code == "unavailable"
    assert "no planner answers placement.request" in reply.error.message


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ("{", None, "not valid JSON"),
        ("", None, "empty body"),
        ("[1, 2]", None, "Expected `object`"),
        (
            '{"model": "llama-3.1-8b", "contxt_tokens": 4096}',
            "contxt_tokens",
            "did you mean `context_tokens`",
        ),
        ('{"model": "llama-3.1-8b", "batch": "two"}', "batch", "Expected `int`"),
        ('{"model": "llama-3.1-8b", "batch": 0}', "batch", ">= 1"),
        ('{"context_tokens": 4096}', "model", "missing required field"),
        ('{"model": "x", "objective": "fastest"}', "objective", "throughput"),
        ('{"model": "x", "exclude_nodes": ["Rig A"]}', "exclude_nodes[0]", "regex"),
        ('{"model": {"name": "m", "layers": 0}}', "model.layers", ">= 1"),
        ('{"model": "x", "memory_headroom": 1.5}', "memory_headroom", "< 1.0"),
    ],
)
async def test_bad_placement_input_is_400_naming_the_field(
    api_url: str, http: aiohttp.ClientSession, body: str, field: str | None, words: str
) -> None:
    status, reply = await post(http, api_url + "/api/placements", body)
    assert status == 400, reply
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_request"
    assert reply["error"]["field"] == field
    assert words in reply["error"]["message"]


async def test_nothing_a_client_sends_crashes_the_server(
    api_url: str, http: aiohttp.ClientSession, fleet_kv: KeyValue
) -> None:
    for path, expected in (
        ("/api/nope", 404),
        ("/api/gpu/devices?colour=red", 400),
        ("/api/gpu/devices?status=sleeping", 400),
        ("/api/gpu/devices/rig-a/zero", 400),
        ("/api/gpu/devices/rig-a/7", 404),
        ("/api/gpu/history?device=rig-z/0", 404),
        ("/api/nodes?x=1", 400),
    ):
        status, err = await get(http, api_url + path)
        assert status == expected, path
        assert err["ok"] is False and err["error"]["message"], path
    async with http.delete(api_url + "/api/placements") as r:
        assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
    async with http.post(api_url + "/api/placements", data=b"\xff\xfe\x00garbage") as r:
        assert r.status == 400
    async with http.post(
        api_url + "/api/placements", data=b"{" + b" " * (2 * 1024 * 1024) + b"}"
    ) as r:
        err = await r.json()
        assert r.status == 413 and err["error"]["code"] == "invalid_request"
        assert "1048576" in err["error"]["message"]  # the limit, named
    # A value in the bucket that is not a DeviceState is skipped and counted, not fatal.
    await fleet_kv.put("devices.rig-z.0", b"\x00 not msgpack")

    async def counted() -> None:
        async with http.get(api_url + "/metrics") as r:
            assert "shardplane_api_kv_invalid_total 1" in await r.text()

    await eventually(counted)
    status, body = await get(http, api_url + "/api/gpu/devices")
    assert status == 200 and body["count"] == len(FLEET)


async def test_history_for_charts(
    api_url: str, http: aiohttp.ClientSession, fleet_kv: KeyValue
) -> None:
    now = time.time()
    for i in range(3):
        revision = await put_device(
            fleet_kv, FLEET[0], seq=10 + i, ts=now + i, utilization_gpu_pct=20.0 * i
        )

        # The bucket keeps one value per key (history=1): a put replaces the previous value
        # in the stream itself, so a watch that has not yet delivered a value when the next
        # put lands never gets it (the server skips to the newest, as it must). An agent
        # samples every few seconds; these puts are microseconds apart, and on a loaded
        # machine the server's delivery can trail them. So each sample is written once the
        # API has the one before, as it would be in the fleet; every one must then be charted.
        async def applied(revision: int = revision) -> None:
            _, device = await get(http, api_url + "/api/gpu/devices/rig-a/0")
            assert device["revision"] >= revision

        await eventually(applied)

    async def three_more() -> None:
        _, body = await get(http, api_url + "/api/gpu/history?device=rig-a/0")
        series = body["devices"]["rig-a/0"]
        assert series["util"][-3:] == [0.0, 20.0, 40.0]
        assert series["t"] == sorted(series["t"])

    await eventually(three_more)


async def test_dashboard_is_served_offline(api_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(api_url + "/") as r:
        assert r.status == 200
        html = await r.text()
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html
        async with http.get(api_url + asset) as r:
            assert r.status == 200
            text = await r.text()
            assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
            assert "https://" not in text


async def test_run_api_stops_cleanly_with_clients_connected(
    nc: Client, fleet_kv: KeyValue, http: aiohttp.ClientSession
) -> None:
    from shardplane.api.server import run_api
    from shardplane.natsserver import free_port

    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(run_api(nc, stop=stop, port=port))
    url = f"http://127.0.0.1:{port}"

    async def up() -> None:
        try:
            assert (await get(http, url + "/readyz"))[0] == 200
        except aiohttp.ClientConnectionError as exc:
            raise AssertionError("not listening yet") from exc

    await eventually(up, timeout=30.0)
    async with http.get(url + "/api/events") as resp:
        assert (await next_event(resp, EVENT_WAIT_S))[0] == "hello"
        stop.set()
        await asyncio.wait_for(task, EVENT_WAIT_S)  # the open stream does not hold the shutdown
        assert await resp.content.read() == b""  # and the client sees its end
