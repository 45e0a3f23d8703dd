"""An error reply from the planner names the request it answers (instance id, model), whether
the body failed to decode or the plan failed."""

from __future__ import annotations

import asyncio
import json

import nats
from nats.js import JetStreamContext

from shardplane.bus import codec, subjects
from shardplane.bus.messages import PlacementReply
from shardplane.planner.service import run_planner
from tests.planner.ready import wait_serving


async def test_error_replies_echo_the_request(nats_url: str, js: JetStreamContext) -> None:
    client = await nats.connect(nats_url)
    stop = asyncio.Event()
    task = asyncio.create_task(run_planner(client, stop=stop))
    try:
        await wait_serving(client, task)
        bad = b'{"model":"llama-3.1-8b","instance_id":"mine-1","context_tokenz":5}'
        msg = await client.request(subjects.PLACEMENT_REQUEST, bad, timeout=20)
        reply = codec.decode(PlacementReply, msg.data, "json")
        assert reply.error is not None and reply.error.code == "invalid_request"
        assert (reply.instance_id, reply.model) == ("mine-1", "llama-3.1-8b")
        # Decoded fine, failed to plan (no devices): the reply still names the request.
        body = {"model": "llama-3.1-8b", "instance_id": "mine-2", "context_tokens": 4096}
        msg = await client.request(subjects.PLACEMENT_REQUEST, json.dumps(body).encode(), 20)
        reply = codec.decode(PlacementReply, msg.data, "json")
        assert reply.error is not None and reply.error.code == "no_devices"
        assert (reply.instance_id, reply.model, reply.context_tokens) == (
            "mine-2",
            "llama-3.1-8b",
            4096,
        )
        # A JSON scalar is answered in JSON, a BOM-prefixed request is read as JSON.
        msg = await client.request(subjects.PLACEMENT_REQUEST, b"null", timeout=20)
        assert json.loads(msg.data)["error"]["code"] == "invalid_request"
        msg = await client.request(subjects.PLACEMENT_REQUEST, codec.BOM + bad, timeout=20)
        assert json.loads(msg.data)["instance_id"] == "mine-1"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await client.drain()
