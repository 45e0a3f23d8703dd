"""End to end on the simulated heterogeneous fleet: agents (fleets/demo.toml) -> projector ->
planner -> workers, over a real NATS server. At batch 1 an 8B model stays on one device; the
70B needs several, and its step time is the sum of its stage and hop times (one sequence cannot
be pipelined), which CP-SAT proves optimal."""

from __future__ import annotations

import json

import pytest
from nats.aio.client import Client

from shardplane.bus import codec
from shardplane.bus.messages import PlacementReply
from tests.e2e.helpers import LONG_TTL_S, running, settled_in, wait_devices
from tests.kit import wait_instance
from tests.planner.ready import wait_planners


async def test_cp_sat_places_70b_on_the_simulated_fleet_optimally(
    nats_url: str, nc: Client
) -> None:
    # Not about liveness: a long projector TTL keeps a stall from marking devices offline.
    async with running(nats_url, interval_s=0.5, ttl_s=LONG_TTL_S):
        await wait_devices(nc, 7)
        await wait_planners(nc)  # its endpoint may still be subscribing
        # The 8B at batch 1 fits the A100 alone, and one device beats any pipeline.
        msg = await nc.request(
            "placement.request",
            json.dumps({"model": "llama-3.1-8b", "dry_run": True}).encode(),
            timeout=30,
        )
        small = codec.decode(PlacementReply, msg.data, "json")
        assert small.ok, small.error
        assert [s.device for s in small.stages] == ["rig-a/0"], small.stages
        assert small.step_ms == pytest.approx(small.stages[0].stage_ms, rel=1e-9)
        assert small.stages[0].hop_ms == 0.0
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
        assert reply.stages[0].layer_start == 0 and reply.stages[-1].layer_end == 80
        assert len(reply.stages) >= 2  # 131 GiB of weights: no single device holds them
        # batch 1: one micro-batch; the step is the round trip (the last hop is the return).
        assert (reply.batch, reply.microbatches) == (1, 1)
        recomputed = sum(s.stage_ms + s.hop_ms for s in reply.stages)
        assert reply.step_ms == pytest.approx(recomputed, rel=1e-9)
        assert reply.tokens_per_s == pytest.approx(1000.0 / recomputed, rel=1e-9)
        assert reply.lower_bound_ms <= reply.step_ms and reply.max_batch >= 1
        # Each node's devices are contiguous in the pipeline.
        nodes = [s.node for s in reply.stages]
        assert nodes == sorted(nodes, key=nodes.index)
        state = await wait_instance(nc, "sim-70b", settled_in({"loaded", "reserved"}))
        assert state.generation == reply.generation and len(state.stages) == len(reply.stages)
