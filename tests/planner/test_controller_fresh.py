"""The controller heals on faults its cache shows only once that cache has every write the
bucket holds: its watch can be behind the planner's (a device that just joined, a watch
replaying after a lost server), and the plan it checks was made on the newer view.

The failover bench saw it: a device the planner placed on a moment after it appeared was
"gone from the cluster state" to the controller, which moved the instance off it at once.
"""

from __future__ import annotations

import asyncio
import json
import time

from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.bus import codec, keys, subjects
from shardplane.bus.messages import PlacementReply
from shardplane.bus.streams import CLUSTER_STATE, LEDGER
from shardplane.planner.controller import Controller
from shardplane.planner.health import HealConfig
from shardplane.planner.synthetic import device_state
from tests.kit import eventually
from tests.planner.fleetkit import put_device
from tests.planner.ready import planner_running


async def _place_fresh(nc: Client, js: JetStreamContext) -> None:
    """Two devices in the bucket; instance "fresh" placed on ha/0."""
    for node in ("ha", "hb"):
        await put_device(js, device_state(node, 0, "A100-80GB"))
    body = {"model": "llama-3.1-8b", "instance_id": "fresh", "exclude_nodes": ["hb"]}
    msg = await nc.request(subjects.PLACEMENT_REQUEST, json.dumps(body).encode(), timeout=30)
    reply = codec.decode(PlacementReply, msg.data, "json")
    assert reply.ok and [s.device for s in reply.stages] == ["ha/0"], reply


async def test_a_fault_seen_on_a_cache_behind_the_bucket_heals_nothing_until_confirmed(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    async with planner_running(nats_url):
        await _place_fresh(nc, js)
        controller = Controller(nc, HealConfig(confirm_s=0.3))
        ledger_kv = await js.key_value(LEDGER)
        # Its watch not started: as far behind as a watch gets. ha/0 is not in its cache.
        await controller.check_all(ledger_kv)
        assert controller.decisions == []
        stop = asyncio.Event()
        follower = asyncio.create_task(controller.cache.follow(js, stop))
        try:
            await eventually(lambda: "ha/0" in controller.cache.devices, what="ha/0 in the cache")
            await controller.check_all(ledger_kv)
            assert controller.decisions == []
            # Now really gone: healed on the first check after the cache has seen it go.
            await (await js.key_value(CLUSTER_STATE)).delete(keys.device_key("ha", 0))
            await eventually(lambda: "ha/0" not in controller.cache.devices, what="ha/0 gone")
            await controller.check_all(ledger_kv)
            [decision] = controller.decisions
            assert decision.instance_id == "fresh" and not decision.soft, decision
            assert decision.reason == "device ha/0 gone from the cluster state", decision
        finally:
            stop.set()
            await follower


async def test_a_check_waits_for_a_lagging_cache_and_judges_on_what_it_then_holds(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    """The usual case: the watch is a moment behind. The check waits for it (well within
    ``confirm_s``) and finds nothing wrong, rather than skipping or healing."""
    confirm_s = 10.0
    async with planner_running(nats_url):
        await _place_fresh(nc, js)
        controller = Controller(nc, HealConfig(confirm_s=confirm_s))
        stop = asyncio.Event()

        async def follow_late() -> None:
            await asyncio.sleep(0.5)
            await controller.cache.follow(js, stop)

        follower = asyncio.create_task(follow_late())
        try:
            started = time.monotonic()
            await controller.check_all(await js.key_value(LEDGER))
            took = time.monotonic() - started
            assert "ha/0" in controller.cache.devices and controller.decisions == []
            assert took < confirm_s, f"the check gave up after {took:.1f} s"
        finally:
            stop.set()
            await follower
