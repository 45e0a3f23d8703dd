"""The projector end to end on a real NATS server."""

from __future__ import annotations

from nats.js import JetStreamContext

from bus import codec, subjects
from tests.projector.helpers import (
    assignment,
    device,
    heartbeat,
    instance,
    node_state,
    projector,
    sample,
    status,
    until,
)
from nats.aio.client import Client


async def test_samples_heartbeats_assignments_and_statuses_reach_the_kv(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    async with projector(nats_url):
        for seq in range(5):
            await js.publish(subjects.gpu_sample("rig-a", 0), codec.encode(sample("rig-a", 0, seq)))
        await js.publish(subjects.node_heartbeat("rig-a"), codec.encode(heartbeat("rig-a", 1)))
        state = await until(lambda: device(nc, "rig-a", 0), lambda s: s is not None and s.sample.seq == 4)
        assert state is not None and state.online
        node = await until(lambda: node_state(nc, "rig-a"), lambda s: s is not None)
        assert node is not None and node.online

        # Status first (SHARDS and PLACEMENTS are separate streams): deferred, then applied.
        await js.publish(
            subjects.shard_status("rig-a", "inst"),
            codec.encode(status("inst", 1, "rig-a", 0, "loaded", 1)),
        )
        for stage, node_id in enumerate(("rig-a", "rig-b")):
            await js.publish(
                subjects.assigned(node_id), codec.encode(assignment("inst", 1, node_id, stage, 2))
            )
        inst = await until(
            lambda: instance(nc, "inst"), lambda s: s is not None and s.stages[0].state == "loaded"
        )
        assert inst is not None and inst.state == "loading"
        await js.publish(
            subjects.shard_status("rig-b", "inst"),
            codec.encode(status("inst", 1, "rig-b", 1, "loaded", 1)),
        )
        inst = await until(lambda: instance(nc, "inst"), lambda s: s is not None and s.state == "loaded")
