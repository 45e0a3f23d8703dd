"""End to end on a real NATS server: agents of the heterogeneous demo fleet, projector,
planner; a placement is planned, assigned, acknowledged by the workers and materialised."""

from __future__ import annotations

import json

import msgspec
from nats.aio.client import Client

from shardplane.bus import codec, subjects
from shardplane.bus.messages import PlacementReply, ShardAssignment
from shardplane.bus.streams import PLACEMENTS
from shardplane.commands import fleet_device_count
from tests.e2e.helpers import DEMO_FLEET, assert_valid_plan, running, settled_in, wait_devices
from tests.kit import wait_instance
from tests.planner.ready import wait_planners

LLAMA_70B_LAYERS = 80


async def test_demo_fleet_placement_flows_end_to_end(nats_url: str, nc: Client) -> None:
    expected = fleet_device_count(DEMO_FLEET)
    async with running(nats_url):
        devices = await wait_devices(nc, expected)
        await wait_planners(nc)  # its endpoint may still be subscribing
        assert len({d.sample.name for d in devices.values()}) >= 4, "the demo fleet must be mixed"

        body = {"model": "llama-3.1-70b", "context_tokens": 8192, "instance_id": "e2e-70b"}
        msg = await nc.request(subjects.PLACEMENT_REQUEST, json.dumps(body).encode(), timeout=30)
        reply = codec.decode(PlacementReply, msg.data, "json")
        assert_valid_plan(reply, LLAMA_70B_LAYERS, devices)
        assert reply.instance_id == "e2e-70b"
        assert reply.generation >= 1

        # Every assignment reached the stream, on the subject of the node that runs it.
        js = nc.jetstream()
        for stage in reply.stages:
            stored = await js.get_last_msg(PLACEMENTS, subjects.assigned(stage.node))
            assert stored.data is not None
            assignment = codec.decode(ShardAssignment, stored.data)
            assert assignment.instance_id == "e2e-70b" and assignment.node == stage.node

        # ...and every worker answered: the instance in the KV shows each stage reported.
        state = await wait_instance(nc, "e2e-70b", settled_in({"reserved", "loaded"}))
        assert state.generation == reply.generation
        assert [(s.node, s.layer_start, s.layer_end) for s in state.stages] == [
            (s.node, s.layer_start, s.layer_end) for s in reply.stages
        ]
        assert all(s.state == "reserved" for s in state.stages), [s.state for s in state.stages]
        assert state.state == "reserved"


async def test_placement_request_speaks_json_msgpack_and_survives_garbage(
    nats_url: str, nc: Client
) -> None:
    expected = fleet_device_count(DEMO_FLEET)
    async with running(nats_url):
        await wait_devices(nc, expected)
        await wait_planners(nc)  # its endpoint may still be subscribing

        # Raw JSON bytes, as `nats req` would send them: a JSON reply.
        raw = b'{"model": "llama-3.1-8b", "dry_run": true}'
        msg = await nc.request(subjects.PLACEMENT_REQUEST, raw, timeout=30)
        as_json = json.loads(msg.data)
        assert as_json["ok"] is True, as_json
        assert as_json["stages"]

        # MessagePack in, MessagePack out.
        packed = msgspec.msgpack.encode({"model": "llama-3.1-8b", "dry_run": True})
        msg = await nc.request(subjects.PLACEMENT_REQUEST, packed, timeout=30)
        as_msgpack = msgspec.msgpack.decode(msg.data)
        assert isinstance(as_msgpack, dict) and as_msgpack["ok"] is True

        # Malformed: a JSON error naming what was wrong, and the planner keeps answering.
        msg = await nc.request(
            subjects.PLACEMENT_REQUEST, b'{"model": "x", "batch": -3', timeout=30
        )
        error = json.loads(msg.data)
        assert error["ok"] is False and error["error"]["code"] == "invalid_request"
        msg = await nc.request(
            subjects.PLACEMENT_REQUEST, b'{"model": "x", "batch": -3}', timeout=30
        )
        error = json.loads(msg.data)
        assert error["error"]["code"] == "invalid_request" and "batch" in error["error"]["message"]
        msg = await nc.request(subjects.PLACEMENT_REQUEST, b"", timeout=30)
        assert json.loads(msg.data)["error"]["code"] == "invalid_request"
        msg = await nc.request(
            subjects.PLACEMENT_REQUEST, b'{"model": "no-such-model"}', timeout=30
        )
        assert json.loads(msg.data)["error"]["code"] == "unknown_model"

        msg = await nc.request(subjects.PLACEMENT_REQUEST, raw, timeout=30)
        assert json.loads(msg.data)["ok"] is True
