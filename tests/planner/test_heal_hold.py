"""The controller's hysteresis, check by check: the real controller (its own cache, fed by the
KV watch) judging a real planner's plan and dry runs, with the device's readings written into
``cluster_state`` by the test and each check run by hand once both have seen them.

``tests/e2e/test_heal.py``'s throttle blip runs the whole system on the clock, so whether the
controller sees the throttle at all is up to timing (it passed with ``hold_checks = 1``); here
the blip is seen on exactly one check, degraded and with a better plan, and a throttle that
stays is seen on three: the default ``hold_checks`` is what separates them.
"""

from __future__ import annotations

import asyncio
import json

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.bus import codec, keys, subjects
from shardplane.bus.messages import PlacementReply
from shardplane.bus.streams import CLUSTER_STATE, LEDGER
from shardplane.planner.controller import Controller
from shardplane.planner.health import HealConfig
from shardplane.planner.synthetic import HostSpec, device_state, node_state
from tests.kit import eventually
from tests.planner.fleetkit import put_device
from tests.planner.ready import planner_running

HOSTS = (HostSpec("ha", ("A100-80GB",)), HostSpec("hb", ("A100-80GB",)))
MAX_MHZ = 1410.0
# Thermally throttled (the planner leaves it out) at 45 % of its clock: one reading of it smooths (EWMA 0.3) to 83.5 % of the
# bandwidth placed with, past the 15 % margin (degraded); the next unthrottled one to 88.5 %,
# inside it. So a blip of one reading is degraded on one check only.
BLIP_RATIO = 0.45


async def _publish(js: JetStreamContext, seq: int, ratio: float = 1.0, hosts: int = 2) -> None:
    """The first ``hosts`` nodes (a heartbeat interval long enough for the test) and their
    devices, ha/0 at ``ratio`` of its clock."""
    kv = await js.key_value(CLUSTER_STATE)
    for host in HOSTS[:hosts]:
        state = node_state(host)
        beat = msgspec.structs.replace(state.heartbeat, interval_s=600.0)
        await kv.put(
            keys.node_key(host.name), codec.encode(msgspec.structs.replace(state, heartbeat=beat))
        )
    dev = device_state("ha", 0, "A100-80GB", throttle=("hw_slowdown",) if ratio < 1.0 else ())
    sample = msgspec.structs.replace(
        dev.sample, seq=seq, sm_clock_mhz=MAX_MHZ * ratio, sm_clock_max_mhz=MAX_MHZ
    )
    await put_device(js, msgspec.structs.replace(dev, sample=sample))
    if hosts > 1:
        await put_device(js, device_state("hb", 0, "A100-80GB"))


async def _place(nc: Client, **body: object) -> PlacementReply:
    msg = await nc.request(subjects.PLACEMENT_REQUEST, json.dumps(body).encode(), timeout=30)
    return codec.decode(PlacementReply, msg.data, "json")


class _Rig:
    """A controller and the planner it asks, both made to see each reading before a check."""

    def __init__(self, nc: Client, js: JetStreamContext, controller: Controller) -> None:
        self.nc, self.js, self.controller, self.seq = nc, js, controller, 1

    async def check(self, ratio: float = 1.0) -> int:
        """One check with ha/0 at ``ratio``; the number of heals decided so far."""
        self.seq += 1
        seq = self.seq
        await _publish(self.js, seq, ratio)
        cache = self.controller.cache
        await eventually(
            lambda: cache.devices.get("ha/0"),
            lambda d: d is not None and d.sample.seq == seq,
            what=f"the controller's cache at sample {seq}",
        )
        # The planner's view: ha/0 alone is placeable exactly when it is not throttled.
        await eventually(
            lambda: _place(self.nc, model="llama-3.1-8b", dry_run=True, exclude_nodes=["hb"]),
            lambda r: r.ok == (ratio == 1.0),
            what=f"the planner seeing ha/0 at {ratio:.0%} of its clock",
        )
        await self.controller.check_all(await self.js.key_value(LEDGER))
        return len(self.controller.decisions)


async def test_a_blip_seen_on_fewer_checks_than_the_hold_moves_nothing(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    assert HealConfig().hold_checks == 3  # the figures below are worked out for it
    await _publish(js, 1, hosts=1)  # hb joins after: the instance's own request names no node
    async with planner_running(nats_url):
        reply = await _place(nc, model="llama-3.1-8b", instance_id="blip")
        assert reply.ok and reply.stages[0].device == "ha/0", reply
        controller = Controller(nc)
        stop = asyncio.Event()
        follower = asyncio.create_task(controller.cache.follow(js, stop))
        try:
            rig = _Rig(nc, js, controller)
            assert await rig.check() == 0  # the smoothing starts from the placed bandwidth
            # The blip: degraded, and the planner has a better plan (hb/0), on this check only.
            assert await rig.check(BLIP_RATIO) == 0, controller.decisions
            for _ in range(3):
                assert await rig.check() == 0, controller.decisions
            # The same throttle held: moved on its third check, not before.
            assert await rig.check(BLIP_RATIO) == 0, controller.decisions
            assert await rig.check(BLIP_RATIO) == 0, controller.decisions
            assert await rig.check(BLIP_RATIO) == 1
            decision = controller.decisions[0]
            assert decision.instance_id == "blip" and decision.soft, decision
            assert "ha/0" in decision.reason, decision.reason
        finally:
            stop.set()
            await follower
