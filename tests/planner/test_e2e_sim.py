"""End to end on the simulated heterogeneous fleet: agents (fleets/demo.toml) -> projector ->
planner -> workers, over a real NATS server. CP-SAT places the 70B and proves it optimal."""

from __future__ import annotations

import json

from nats.aio.client import Client

from shardplane.bus import codec
from shardplane.bus.messages import PlacementReply
from tests.e2e.helpers import LONG_TTL_S, running, wait_devices, wait_instance
from tests.planner.ready import wait_planners


async def test_cp_sat_places_70b_on_the_simulated_fleet_optimally(
    nats_url: str, nc: Client
) -> None:
    # Not about liveness: a long projector TTL keeps a stall from marking devices offline.
    async with running(nats_url, interval_s=0.5, ttl_s=LONG_TTL_S):
        await wait_devices(nc, 7)
        await wait_planners(nc)  # its endpoint may still be subscribing
        time_limit_s = 30.0
        body = {
            "model": "llama-3.1-70b",
            "context_tokens": 8192,
            "instance_id": "sim-70b",
            "solver": "cp-sat",
            "time_limit_s": time_limit_s,
        }
        msg = await nc.request(
            "placement.request", json.dumps(body).encode(), timeout=time_limit_s + 20
        )
        reply = codec.decode(PlacementReply, msg.data, "json")
        assert reply.ok, reply.error
        assert (reply.solver, reply.status, reply.gap_pct) == ("cp-sat", "optimal", 0.0)
        assert reply.lower_bound_ms <= reply.bottleneck_ms
        assert reply.stages[0].layer_start == 0 and reply.stages[-1].layer_end == 80
        # Multi-GPU hosts use every GPU; each node's devices are contiguous in the pipeline.
        nodes = [s.node for s in reply.stages]
        assert sorted(set(nodes)) == ["rig-a", "rig-b", "rig-c", "rig-d"] and len(nodes) == 7
        assert nodes == sorted(nodes, key=nodes.index)
        state = await wait_instance(nc, "sim-70b", {"loaded", "reserved"})
        assert state.generation == reply.generation and len(state.stages) == 7
