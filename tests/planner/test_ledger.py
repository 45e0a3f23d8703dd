"""The memory ledger through a real NATS server: never promise memory twice, with 100
concurrent requests and with two planner processes; instance_id idempotency; dry runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import defaultdict
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.bus import codec
from shardplane.bus.messages import InstanceState, PlacementReply, ShardState, StageState
from shardplane.bus.streams import LEDGER
from shardplane.planner import ledger
from shardplane.planner.synthetic import HostSpec, device_state
from tests import kit
from tests.planner.fleetkit import publish_fleet
from tests.planner.ready import wait_planners
from tests.planner.test_service import ask, planner_running

GIB = 1024**3
REPO = Path(__file__).resolve().parents[2]

# Four 24 GiB cards on two hosts: room for a handful of 8B instances, not 100.
TIGHT = (HostSpec("ra", ("RTX-4090", "RTX-4090")), HostSpec("rb", ("RTX-3090", "RTX-3090")))
USABLE = int(24 * GIB - 0.1 * 24 * GIB)  # free less 10% headroom (nothing used)


def _check_no_overpromise(replies: list[PlacementReply]) -> dict[str, int]:
    used: dict[str, int] = defaultdict(int)
    for r in replies:
        if r.ok:
            for s in r.stages:
                used[s.device] += s.memory_bytes
        else:
            assert r.error is not None and r.error.code == "insufficient_memory", r.error
    for device, total in used.items():
        assert total <= USABLE, (
            f"{device}: promised {total / GIB:.2f} GiB of {USABLE / GIB:.2f} GiB usable"
        )
    return used


async def _ledger_doc(js: JetStreamContext) -> ledger.LedgerDoc:
    kv = await js.key_value(LEDGER)
    doc, _ = await ledger.read(kv)
    return doc


async def _burst(nc: Client, n: int, prefix: str) -> list[PlacementReply]:
    async def one(i: int) -> PlacementReply:
        body = {
            "model": "llama-3.1-8b",
            "context_tokens": 4096,
            "instance_id": f"{prefix}-{i}",
            "time_limit_s": 2.0,
        }
        msg = await nc.request("placement.request", json.dumps(body).encode(), timeout=60)
        return codec.decode(PlacementReply, msg.data, "json")

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_hundred_concurrent_requests_never_overpromise(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    await publish_fleet(js, TIGHT)
    async with planner_running(nats_url):
        replies = await _burst(nc, 100, "c")
    ok = [r for r in replies if r.ok]
    assert 2 <= len(ok) < 100
    used = _check_no_overpromise(replies)
    doc = await _ledger_doc(js)
    assert set(doc.instances) == {r.instance_id for r in ok}
    promised: dict[str, int] = defaultdict(int)
    for entry in doc.instances.values():
        for dev, b in entry.devices.items():
            promised[dev] += b
    assert dict(promised) == dict(used)
    # A refusal says how short the fleet is.
    refused = next(r for r in replies if not r.ok)
    assert refused.error is not None and "GiB" in refused.error.message


async def test_two_planner_processes_share_one_ledger(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    await publish_fleet(js, TIGHT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = (
        "import asyncio, signal, nats\n"
        "from planner.service import run_planner\n"
        "async def main():\n"
        f"    nc = await nats.connect({nats_url!r})\n"
        "    stop = asyncio.Event()\n"
        "    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)\n"
        "    await run_planner(nc, stop=stop)\n"
        "    await nc.close()\n"
        "asyncio.run(main())\n"
    )
    other = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env, cwd=REPO)
    try:
        async with planner_running(nats_url):
            # Both planners serve placement.request before the burst (the second one is a
            # fresh interpreter importing everything: slow on a busy machine).
            await wait_planners(nc, count=2, timeout=90)
            replies = await _burst(nc, 100, "p")
            stats_inbox = nc.new_inbox()
            sub = await nc.subscribe(stats_inbox)
            await nc.publish("$SRV.STATS.shardplane-planner", b"", reply=stats_inbox)
            served: list[int] = []
            for _ in range(2):
                msg = await sub.next_msg(timeout=10)
                served.append(json.loads(msg.data)["endpoints"][0]["num_requests"])
    finally:
        other.send_signal(signal.SIGTERM)
        await asyncio.wait_for(other.wait(), timeout=20)
    assert all(n > 0 for n in served), f"both planners served requests: {served}"
    ok = [r for r in replies if r.ok]
    assert len(ok) >= 2
    _check_no_overpromise(replies)
    assert set((await _ledger_doc(js)).instances) == {r.instance_id for r in ok}


async def test_idempotent_instance_id_and_dry_run_reserves_nothing(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    await publish_fleet(js, TIGHT)
    async with planner_running(nats_url):
        dry = await ask(nc, {"model": "llama-3.1-8b", "dry_run": True, "instance_id": "dry"})
        assert dry.ok and dry.dry_run and dry.generation == 0
        assert "dry" not in (await _ledger_doc(js)).instances
        a, b = await asyncio.gather(
            ask(nc, {"model": "llama-3.1-8b", "instance_id": "same"}),
            ask(nc, {"model": "llama-3.1-8b", "instance_id": "same"}),
        )
        assert a.ok and b.ok and a.stages == b.stages and a.generation == b.generation == 1
        # A changed request for the same instance is a new generation that replaces the old
        # promise rather than adding to it.
        c = await ask(nc, {"model": "llama-3.1-8b", "instance_id": "same", "context_tokens": 16384})
        assert c.ok and c.generation == 2
        doc = await _ledger_doc(js)
        assert doc.instances["same"].generation == 2
        assert sum(doc.instances["same"].devices.values()) == sum(s.memory_bytes for s in c.stages)


def _entry(devices: dict[str, int], generation: int = 1) -> ledger.LedgerEntry:
    return ledger.LedgerEntry(
        generation=generation, model="m", fingerprint="f", devices=devices, nodes=("n",)
    )


def _two_stage_instance(second: ShardState) -> InstanceState:
    """Instance "a" on n/0 (loaded) and n/1 (``second``), as the projector writes it."""
    stages = (
        StageState(stage=0, node="n", device="n/0", layer_start=0, layer_end=1, state="loaded"),
        StageState(stage=1, node="n", device="n/1", layer_start=1, layer_end=2, state=second),
    )
    return kit.instance("a", stages, updated=100.0)


def test_promised_bytes_skips_materialised_and_released() -> None:

    doc = ledger.LedgerDoc(
        instances={
            "a": _entry({"n/0": 10, "n/1": 5}),
            "b": _entry({"n/0": 7}, generation=2),
            "c": _entry({"n/1": 100}),
        }
    )
    loaded = _two_stage_instance(second="loading")
    released = kit.instance("c", stage_count=1, state="released")
    devices = {
        "n/0": device_state("n", 0, "A10", ts=200.0),
        "n/1": device_state("n", 1, "A10", ts=50.0),
    }
    got = ledger.promised_bytes(
        doc, exclude_instance="b", instances={"a": loaded, "c": released}, devices=devices
    )
    # a's stage 0 is loaded and the device has reported since: telemetry already shows it.
    assert got == {"n/1": 5}


def test_replacing_an_instance_credits_back_what_it_has_loaded() -> None:
    from shardplane.planner.fleet import Device

    doc = ledger.LedgerDoc(
        instances={
            "a": _entry({"n/0": 10, "n/1": 5}),
        }
    )
    loaded = _two_stage_instance(second="pending")
    devices = {
        "n/0": device_state("n", 0, "A10", ts=200.0),
        "n/1": device_state("n", 1, "A10", ts=200.0),
    }
    got = ledger.promised_bytes(doc, exclude_instance="a", instances={"a": loaded}, devices=devices)
    assert got == {"n/0": -10}  # loaded: comes back; pending: never counted
    dev = Device(
        ref="n/0",
        node="n",
        index=0,
        gpu="g",
        bandwidth_gbps=1.0,
        total_bytes=100,
        free_bytes=95,
        promised_bytes=-10,
    )
    assert dev.usable_bytes(0.0) == 100  # credited, but never beyond the device's total
