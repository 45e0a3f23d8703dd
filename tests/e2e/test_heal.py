"""Instances that heal, end to end on the simulated demo fleet over a real NATS server: release,
a vanished device re-placed by the controller with minimal moves, a forged generation that
cannot take an id over, and a failed publish that the ledger repairs."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shardplane.bus import authority, codec, keys, subjects
from shardplane.bus.messages import (
    DeviceState,
    InstanceState,
    PlacementReply,
    ReleaseReply,
    ShardAssignment,
    ShardStatus,
)
from shardplane.bus.streams import LEDGER, PLACEMENTS, provision
from shardplane.planner import ledger
from tests import kit
from tests.e2e.helpers import LONG_TTL_S, running, wait_devices
from tests.planner.ready import wait_planners


async def place(nc: Client, **body: object) -> PlacementReply:
    msg = await nc.request(subjects.PLACEMENT_REQUEST, json.dumps(body).encode(), timeout=60)
    return codec.decode(PlacementReply, msg.data, "json")


async def release(nc: Client, instance_id: str) -> ReleaseReply:
    body = json.dumps({"instance_id": instance_id}).encode()
    msg = await nc.request(subjects.PLACEMENT_RELEASE, body, timeout=30)
    return codec.decode(ReleaseReply, msg.data, "json")


async def instance(nc: Client, instance_id: str) -> InstanceState | None:
    return await kit.kv_value(nc, InstanceState, keys.instance_key(instance_id))


async def until_instance(
    nc: Client,
    instance_id: str,
    check: Callable[[InstanceState], bool],
    what: str,
    timeout: float = 60.0,
) -> InstanceState:
    return await kit.wait_instance(nc, instance_id, check, what=what, timeout=timeout)


def ready(generation: int) -> Callable[[InstanceState], bool]:
    def ok(s: InstanceState) -> bool:
        return (
            s.generation == generation
            and len(s.stages) == s.stage_count
            and all(st.state in ("loaded", "reserved") for st in s.stages)
        )

    return ok


async def placed(
    nc: Client, instance_id: str, model: str = "llama-3.1-8b", **body: object
) -> PlacementReply:
    """Once the demo fleet is online and a planner answers: ``instance_id`` placed and its
    generation 1 loaded."""
    await wait_devices(nc, 7)
    await wait_planners(nc)
    reply = await place(nc, model=model, instance_id=instance_id, **body)
    assert reply.ok, reply
    await until_instance(nc, instance_id, ready(1), "loaded")
    return reply


async def test_release_frees_memory_and_is_idempotent(nats_url: str, nc: Client) -> None:
    async with running(nats_url):
        reply = await placed(nc, "rel-8b")
        kv = await nc.jetstream().key_value(LEDGER)
        doc, _ = await ledger.read(kv)
        promised = sum(doc.instances["rel-8b"].devices.values())
        assert promised > 0

        first = await release(nc, "rel-8b")
        assert first.ok and not first.already, first
        assert first.generation == 2 and first.released_bytes == promised
        assert set(first.nodes) == {s.node for s in reply.stages}
        state = await until_instance(nc, "rel-8b", lambda s: s.state == "released", "released")
        assert state.generation == 2 and state.stages == ()
        doc, _ = await ledger.read(kv)
        assert doc.instances["rel-8b"].devices == {} and doc.instances["rel-8b"].released

        again = await release(nc, "rel-8b")
        assert again.ok and again.already and again.generation == 2, again
        missing = await release(nc, "never-placed")
        assert not missing.ok and missing.error is not None
        assert missing.error.code == "not_found"
        # The id lives on: placing it again numbers above the release.
        back = await place(nc, model="llama-3.1-8b", instance_id="rel-8b")
        assert back.ok and back.generation == 3, back
        await until_instance(nc, "rel-8b", ready(3), "loaded again")


async def test_forged_generation_cannot_freeze_an_id(nats_url: str, nc: Client) -> None:
    async with running(nats_url):
        reply = await placed(nc, "forge")
        stage = reply.stages[0]
        forged = ShardAssignment(
            instance_id="forge",
            generation=99,
            node=stage.node,
            model="llama-3.1-8b",
            device=stage.device,
            layer_start=0,
            layer_end=32,
            layers_total=32,
            ts=time.time(),
        )
        js = nc.jetstream()
        deadletters = await nc.subscribe(f"{subjects.DEADLETTER}.>")
        await js.publish(subjects.assigned(stage.node), codec.encode(forged))
        # The worker rejects it and reports it (dead letter with the reason).
        msg = await deadletters.next_msg(timeout=20)
        assert msg.headers is not None and "ledger" in json.dumps(msg.headers), msg.headers
        # A new placement of the id still works: generation 2 is the ledger's, and it loads.
        moved = await place(
            nc, model="llama-3.1-8b", instance_id="forge", exclude_nodes=[stage.node]
        )
        assert moved.ok and moved.generation == 2, moved
        state = await until_instance(nc, "forge", ready(2), "generation 2 loaded")
        assert all(s.node != stage.node for s in state.stages)
        view = authority.decode((await (await js.key_value(LEDGER)).get("reservations")).value)
        assert view.instances["forge"].generation == 2


async def test_failed_publish_is_repaired(nats_url: str, nc: Client) -> None:
    """The planner commits, then publishes: a publish that fails leaves the ledger saying so
    and the reply says so; a planner started later (repair on restart) publishes that same
    generation, and a re-send answers it without a new one."""
    js = nc.jetstream()
    # No workers at first: a worker whose stream vanished provisions it again (self-repair),
    # which would let the publish through.
    async with running(nats_url, workers=False):
        await wait_devices(nc, 7)
        await wait_planners(nc)
        await js.delete_stream(PLACEMENTS)  # every assignment publish now fails
        failed = await place(nc, model="llama-3.1-8b", instance_id="pub")
        assert not failed.ok and failed.error is not None
        assert failed.error.code == "internal" and "committed" in failed.error.message
        kv = await js.key_value(LEDGER)
        doc, _ = await ledger.read(kv)
        entry = doc.instances["pub"]
        assert entry.generation == 1 and not entry.published
    await provision(js)  # the stream is back; everything restarts against it
    async with running(nats_url):
        # No request: the new planner's repair pass publishes generation 1 by itself.
        await until_instance(nc, "pub", ready(1), "loaded after the repair", timeout=90)
        doc, _ = await ledger.read(kv)
        assert doc.instances["pub"].published and doc.instances["pub"].generation == 1
        again = await place(nc, model="llama-3.1-8b", instance_id="pub")
        assert again.ok and again.generation == 1, again


async def test_controller_heals_a_vanished_device_with_minimal_moves(
    nats_url: str, nc: Client
) -> None:
    async with running(nats_url):
        reply = await placed(nc, "heal", model="llama-3.1-70b-q8")
        assert len(reply.stages) >= 2, reply.stages
        lost = reply.stages[-1]
        node, index = lost.device.split("/")
        body = json.dumps({"kind": "vanish", "device": int(index)}).encode()
        await nc.request(subjects.sim_fault(node), body, timeout=10)
        healed = await until_instance(
            nc, "heal", lambda s: s.health == "ready" and s.generation >= 2, "healed", 90
        )
        assert all(s.device != lost.device for s in healed.stages)
        kv = await nc.jetstream().key_value(LEDGER)
        doc, _ = await ledger.read(kv)
        stored = await ledger.stored_reply(kv, doc.instances["heal"].plan_key)
        assert stored is not None and stored.bytes_moved is not None
        kept = {(s.device, s.layer_start, s.layer_end) for s in reply.stages}
        assert stored.bytes_kept == sum(
            s.weight_bytes for s in stored.stages if (s.device, s.layer_start, s.layer_end) in kept
        )
        # Every byte of the new plan is either loaded anew or kept where it was (the pure
        # minimal-move choice is tested in tests/planner/test_moves.py).
        total = sum(s.weight_bytes for s in stored.stages)
        assert stored.bytes_moved + (stored.bytes_kept or 0) == total
        assert stored.bytes_moved >= lost.weight_bytes


async def _statuses(nc: Client, node: str, instance_id: str) -> list[ShardStatus]:
    """Every ShardStatus of ``node`` and of the instance from now on, in arrival order."""
    statuses: list[ShardStatus] = []

    async def on_status(msg: Msg) -> None:
        statuses.append(codec.decode(ShardStatus, msg.data))

    await nc.subscribe(f"{subjects.SHARD_STATUS}.{node}.>", cb=on_status)
    await nc.subscribe(f"{subjects.SHARD_STATUS}.*.{instance_id}", cb=on_status)
    return statuses


async def _made_before_broken(statuses: list[ShardStatus], node: str, generation: int) -> None:
    """The old node unloads only after the new stage holds its memory."""
    await kit.eventually(
        lambda: statuses,
        lambda seen: any(s.node == node and s.state == "unloaded" for s in seen),
        timeout=30,
        what=f"{node} unloaded",
    )
    new_up = min(
        s.ts for s in statuses if s.generation == generation and s.state in ("loaded", "reserved")
    )
    old_down = min(s.ts for s in statuses if s.node == node and s.state == "unloaded")
    assert new_up <= old_down, (new_up, old_down)


@pytest.mark.parametrize("kind", ["throttle", "fill", "silent"])
async def test_controller_moves_off_a_faulty_device(nats_url: str, nc: Client, kind: str) -> None:
    """A one-stage instance (the device the fault hits holds the whole model) moves off a
    throttled or full device, or a silent node, and the verdict names what was wrong. A device
    fault leaves its node reporting, so there make-before-break is observed too. A silent node
    is a liveness matter: a short projector TTL, so it goes offline quickly."""
    silent = kind == "silent"
    instance_id = f"fault-{kind}"
    async with running(nats_url, ttl_s=4.0 if silent else LONG_TTL_S):
        reply = await placed(nc, instance_id, max_stages=1)
        assert len(reply.stages) == 1, reply
        hit = reply.stages[0]
        node, index = hit.device.split("/")
        statuses = await _statuses(nc, node, instance_id)
        fault: dict[str, object] = (
            {"kind": kind} if silent else {"kind": kind, "device": int(index)}
        )
        await nc.request(subjects.sim_fault(node), json.dumps(fault).encode(), timeout=10)
        healed = await until_instance(
            nc, instance_id, lambda s: s.health == "ready" and s.generation >= 2, "healed", 90
        )
        gone = node if silent else hit.device
        assert all(gone not in (s.node, s.device) for s in healed.stages), healed
        assert healed.health_reason is not None and gone in healed.health_reason
        if not silent:
            await _made_before_broken(statuses, node, healed.generation)


def _unthrottled(state: DeviceState) -> bool:
    return not {"hw_slowdown", "hw_thermal_slowdown"} & set(state.sample.throttle_reasons)


async def test_a_throttle_blip_moves_nothing(nats_url: str, nc: Client) -> None:
    """A throttle that is over before the gain has held for its checks (the device returns)
    leaves the instance where it is, on the whole system. Whether the controller's checks
    catch the one-second throttle at all is timing here (this passes with ``hold_checks = 1``):
    the hysteresis itself, check by check, is pinned by tests/planner/test_heal_hold.py."""
    async with running(nats_url):
        reply = await placed(nc, "blip", max_stages=1)
        node, index = reply.stages[0].device.split("/")
        mark = await placed(nc, "mark", max_stages=1, exclude_nodes=[node])
        fault_at = time.time()
        body = json.dumps({"kind": "throttle", "device": int(index), "duration_s": 1.0}).encode()
        await nc.request(subjects.sim_fault(node), body, timeout=10)

        async def back() -> DeviceState | None:
            return await kit.kv_value(nc, DeviceState, keys.device_key(node, int(index)))

        await kit.eventually(
            back,
            lambda d: d is not None and d.sample.ts > fault_at + 1.0 and _unthrottled(d),
            timeout=30,
            what=f"{node}/{index} sampled unthrottled after the blip",
        )
        # The marker: the controller checks every instance in one pass, so the passes that
        # heal "mark" (its device vanished now) and follow it until it is ready also judged
        # "blip" with its device back; a move the blip wrongly earned would show by then.
        mark_node, mark_index = mark.stages[0].device.split("/")
        body = json.dumps({"kind": "vanish", "device": int(mark_index)}).encode()
        await nc.request(subjects.sim_fault(mark_node), body, timeout=10)
        await until_instance(
            nc, "mark", lambda s: s.health == "ready" and s.generation >= 2, "marker healed", 90
        )
        state = await instance(nc, "blip")
        assert state is not None and state.generation == 1 and state.health is None, state


async def test_a_device_out_of_memory_moves_at_once(nats_url: str, nc: Client) -> None:
    """A fill that takes every byte (free 0: the stage cannot run) is out of memory: healed
    without the hold that getting full needs (``HealConfig.full_hold_s``, 30 s), and the
    verdict says so. The 98 % fill of the test above is getting full: it waits the hold."""
    async with running(nats_url):
        reply = await placed(nc, "oom", max_stages=1)
        device = reply.stages[0].device
        node, index = device.split("/")
        body = json.dumps({"kind": "fill", "device": int(index), "fraction": 1.0}).encode()
        fault_at = time.monotonic()
        await nc.request(subjects.sim_fault(node), body, timeout=10)
        moved = await until_instance(nc, "oom", lambda s: s.generation >= 2, "healed", 60)
        assert time.monotonic() - fault_at < 15.0
        healed = await until_instance(nc, "oom", lambda s: s.health == "ready", "ready", 60)
        assert all(st.device != device for st in moved.stages), moved
        assert healed.health_reason is not None
        assert f"{device} is out of memory" in healed.health_reason, healed.health_reason


async def _cli(url: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shardplane.cli",
        *args,
        env={**os.environ, "NATS_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_release_command(nats_url: str, nc: Client) -> None:
    async with running(nats_url):
        await wait_devices(nc, 7)
        await wait_planners(nc)
        reply = await place(nc, model="llama-3.1-8b", instance_id="cli-rel")
        assert reply.ok, reply.error
        rc, out = await _cli(nats_url, "release", "cli-rel", "--json")
        assert rc == 0, out
        released = codec.decode(ReleaseReply, out.strip().splitlines()[-1].encode(), "json")
        assert released.ok and released.generation == 2 and not released.already
        rc, out = await _cli(nats_url, "release", "cli-rel")
        assert rc == 0 and "already released" in out, out
        rc, out = await _cli(nats_url, "release", "no-such-instance")
        assert rc == 1 and "not_found" in out, out
        rc, out = await _cli(nats_url, "release", "Not An Id")
        assert rc == 2 and "invalid instance id" in out, out
