"""The planner service end to end through a real NATS server (KV standing in for the projector)."""

from __future__ import annotations

import json
from collections.abc import Mapping

import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.bus import codec
from shardplane.bus.messages import Excluded, PlacementReply, ShardAssignment
from shardplane.bus.streams import PLACEMENTS
from shardplane.planner.synthetic import device_state
from tests.kit import eventually
from tests.planner.fleetkit import DEMO, publish_fleet, put_device
from tests.planner.ready import planner_running


async def ask(nc: Client, body: Mapping[str, object], timeout: float = 30.0) -> PlacementReply:
    msg = await nc.request("placement.request", json.dumps(body).encode(), timeout=timeout)
    return codec.decode(PlacementReply, msg.data, "json")


async def test_places_on_demo_fleet_with_cp_sat_optimal(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    await publish_fleet(js, DEMO)
    async with planner_running(nats_url):
        # Batch 16 at 32k on the demo fleet: the KV cache is worth pipelining, so CP-SAT
        # decides the devices and M, and proves its plan optimal.
        time_limit_s = 20.0
        body = {
            "model": "llama-3.1-8b",
            "context_tokens": 32768,
            "batch": 16,
            "instance_id": "demo-8b",
            "time_limit_s": time_limit_s,
            "solver": "cp-sat",
        }
        reply = await ask(nc, body, timeout=time_limit_s + 20)
        assert reply.ok, reply.error
        assert (reply.solver, reply.status) == ("cp-sat", "optimal")
        assert reply.gap_pct == 0.0
        assert reply.stages[0].layer_start == 0 and reply.stages[-1].layer_end == 32
        assert reply.generation == 1
        assert reply.step_ms >= reply.lower_bound_ms > 0
        assert 1 <= reply.microbatches <= min(16, len(reply.stages))
        assert reply.tokens_per_s == pytest.approx(16 * 1000.0 / reply.step_ms)
        assert reply.max_batch >= 16
        # One assignment per stage on placement.assigned.<node>, in the PLACEMENTS stream.
        info = await js.stream_info(PLACEMENTS)
        assert info.state.messages == len(reply.stages)
        sub = await js.pull_subscribe("placement.assigned.>", durable="t", stream=PLACEMENTS)
        msgs = await sub.fetch(len(reply.stages), timeout=10)
        got = sorted((codec.decode(ShardAssignment, m.data) for m in msgs), key=lambda a: a.stage)
        assert [(a.layer_start, a.layer_end) for a in got] == [
            (s.layer_start, s.layer_end) for s in reply.stages
        ]
        assert all(a.generation == 1 and not a.release for a in got)
        assert [a.device for a in got] == [s.device for s in reply.stages]
        # Idempotent: the same id answers the same plan, publishing nothing new.
        again = await ask(nc, body, timeout=time_limit_s + 20)
        assert again.stages == reply.stages and again.generation == 1
        assert (await js.stream_info(PLACEMENTS)).state.messages == len(reply.stages)
        # The 70B the demo places: every GPU of every host, proven optimal.
        big = await ask(
            nc,
            {"model": "llama-3.1-70b", "context_tokens": 8192, "time_limit_s": time_limit_s},
            timeout=time_limit_s + 20,
        )
        assert big.ok, big.error
        assert len(big.stages) >= 2 and big.microbatches == 1
        assert big.step_ms == pytest.approx(sum(s.stage_ms + s.hop_ms for s in big.stages))


async def test_msgpack_in_msgpack_out_and_errors_in_kind(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    await publish_fleet(js, DEMO)
    async with planner_running(nats_url):
        msg = await nc.request(
            "placement.request",
            msgspec.msgpack.encode({"model": "llama-3.1-8b", "dry_run": True}),
            timeout=30,
        )
        reply = codec.decode(PlacementReply, msg.data, "msgpack")
        assert reply.ok and reply.dry_run and reply.generation == 0
        msg = await nc.request("placement.request", b'{"model": "gpt-17"}', timeout=30)
        body = json.loads(msg.data)
        assert body["ok"] is False and body["error"]["code"] == "unknown_model"
        assert msg.headers and msg.headers.get("Nats-Service-Error-Code") == "404"
        msg = await nc.request(
            "placement.request", b'{"model": "llama-3.1-8b", "contxt": 5}', timeout=30
        )
        assert json.loads(msg.data)["error"]["code"] == "invalid_request"
        assert "contxt" in json.loads(msg.data)["error"]["message"]
        msg = await nc.request("placement.request", b"\x93\x01", timeout=30)  # msgpack, wrong shape
        assert codec.decode(PlacementReply, msg.data, "msgpack").error is not None
        # More micro-batches than sequences: answered, with the numbers.
        bad_m = await ask(nc, {"model": "llama-3.1-8b", "batch": 2, "microbatches": 4})
        assert bad_m.error is not None and bad_m.error.code == "invalid_request"
        assert "microbatches=4 exceeds batch=2" in bad_m.error.message
        # Too big for the fleet: the message carries numbers.
        too_big = await ask(nc, {"model": "llama-3.1-405b", "context_tokens": 131072})
        assert too_big.error is not None and too_big.error.code == "insufficient_memory"
        assert "GiB" in too_big.error.message and "rig-" in too_big.error.message
        # The service API lists the planner.
        info = json.loads((await nc.request("$SRV.INFO.shardplane-planner", b"", timeout=30)).data)
        assert (
            info["name"] == "shardplane-planner"
            and info["endpoints"][0]["subject"] == "placement.request"
        )
        assert info["metadata"] is not None and info["endpoints"][0]["metadata"] == {}
        stats = json.loads(
            (await nc.request("$SRV.STATS.shardplane-planner", b"", timeout=30)).data
        )
        assert stats["endpoints"][0]["num_requests"] >= 4


async def test_offline_device_excluded_with_reason_and_release_on_move(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    await publish_fleet(js, DEMO)
    async with planner_running(nats_url):
        first = await ask(nc, {"model": "llama-3.1-8b", "instance_id": "small", "max_stages": 1})
        assert first.ok and len(first.stages) == 1
        holder = first.stages[0]
        node, index = holder.device.split("/")
        await put_device(js, device_state(node, int(index), _key(holder.gpu), online=False))
        await _until_excluded(nc, holder.device, "offline")
        second = await ask(nc, {"model": "llama-3.1-8b", "instance_id": "small", "max_stages": 1})
        assert second.ok and second.generation == 2
        assert second.stages[0].device != holder.device
        assert any(e.device == holder.device and "offline" in e.reason for e in second.excluded)
        if second.stages[0].node != holder.node:
            sub = await js.pull_subscribe(
                f"placement.assigned.{holder.node}", durable="r", stream=PLACEMENTS
            )
            msgs = await sub.fetch(10, timeout=10)
            releases = [
                a for a in (codec.decode(ShardAssignment, m.data) for m in msgs) if a.release
            ]
            assert releases and releases[0].generation == 2


async def _until_excluded(nc: Client, device: str, reason: str, timeout: float = 30.0) -> None:
    """Dry runs (which change nothing) until the planner's watch-fed cache has the device's new
    state: its replies list the device as excluded for ``reason``."""

    async def excluded() -> tuple[Excluded, ...]:
        dry = await ask(nc, {"model": "llama-3.1-8b", "dry_run": True, "max_stages": 1})
        assert dry.ok and dry.dry_run, dry.error
        return dry.excluded

    await eventually(
        excluded,
        lambda got: any(e.device == device and reason in e.reason for e in got),
        timeout=timeout,
        what=f"{device} excluded ({reason})",
    )


def _key(gpu_name: str) -> str:
    from shardplane.bus.gpus import gpu_spec

    spec = gpu_spec(gpu_name)
    assert spec is not None
    return spec.key


@pytest.mark.parametrize("body", [b"", b"not json", b"{}", b'{"model": 5}'])
async def test_bad_requests_never_stop_the_planner(
    nats_url: str, nc: Client, js: JetStreamContext, body: bytes
) -> None:
    await publish_fleet(js, DEMO)
    async with planner_running(nats_url):
        msg = await nc.request("placement.request", body, timeout=30)
        assert b"invalid_request" in msg.data
        ok = await ask(nc, {"model": "llama-3.2-1b", "dry_run": True})
        assert ok.ok
