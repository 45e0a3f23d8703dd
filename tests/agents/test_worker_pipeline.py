"""The whole path with the real components: simulated heterogeneous fleet (agents) -> projector
-> planner (placement.request with an hf: checkpoint) -> placement.assigned.<node> -> workers
-> shard.status -> projector -> KV. The tiny model is forced across several devices by filling
each device so that little more than the planner's per-stage workspace stays free."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shardplane.agents.loader import StageSpec, stage_bytes
from shardplane.agents.service import run_agents
from shardplane.agents.worker import Worker
from shardplane.bus import codec, keys, subjects
from shardplane.bus.gpus import gpu_spec
from shardplane.bus.messages import DeviceSample, DeviceState, InstanceState, PlacementReply
from shardplane.planner.cost import WORKSPACE_BYTES
from shardplane.planner.service import run_planner
from shardplane.projector.service import run_projector
from tests.agents import ckpt
from tests.agents.busutil import (
    StatusLog,
    assert_interval_kept,
    assign,
    authorize,
    stage,
    until_sample_after,
)
from tests.kit import eventually, kv_value, stop_tasks, wait_instance

NODES = {"w-a": "RTX-3060-12GB", "w-b": "P40", "w-c": "T4", "w-d": "A10"}
LAYERS = 8
SPARE = 7 * 1024**2  # weight bytes each device can take beyond the workspace: ~40% of the model


def fleet_file(path: Path) -> Path:
    lines = ["seed = 3", "interval_s = 0.2", ""]
    for node, gpu in NODES.items():
        lines += ["[[nodes]]", f'name = "{node}"', f'gpus = [{{ model = "{gpu}" }}]', ""]
    for node, gpu in NODES.items():
        spec = gpu_spec(gpu)
        assert spec is not None
        free = WORKSPACE_BYTES + SPARE
        fraction = 1.0 - free / spec.memory_bytes
        lines += [
            "[[faults]]",
            "at_s = 0.0",
            f'node = "{node}"',
            "device = 0",
            'kind = "fill"',
            f"fraction = {fraction!r}",
            "",
        ]
    path.write_text("\n".join(lines))
    return path


@contextlib.asynccontextmanager
async def pipeline(url: str, fleet: Path) -> AsyncGenerator[dict[str, Worker], None]:
    """Projector, planner and simulated agents (telemetry only) each on their own connection,
    plus one Worker per node whose held tensors the test can look at."""
    stop = asyncio.Event()
    clients: list[Client] = []

    async def on_own_connection(body: Callable[[Client], Awaitable[None]]) -> None:
        client = await nats.connect(url)
        clients.append(client)
        await body(client)

    worker_nc = await nats.connect(url)
    clients.append(worker_nc)
    workers = {n: Worker(worker_nc, node=n, use_cuda=False) for n in NODES}
    tasks = [
        # A long liveness TTL: these tests are not about liveness, and with the default (3 x the
        # 0.2 s interval) a stall of a busy machine would mark devices offline and move stages.
        asyncio.create_task(on_own_connection(lambda c: run_projector(c, stop=stop, ttl_s=30))),
        asyncio.create_task(on_own_connection(lambda c: run_planner(c, stop=stop))),
        asyncio.create_task(
            on_own_connection(
                lambda c: run_agents(c, stop=stop, fleet=fleet, interval_s=0.2, workers=False)
            )
        ),
        *(asyncio.create_task(w.run(stop)) for w in workers.values()),
    ]
    try:
        yield workers
    finally:
        await stop_tasks(stop, tasks)
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()


async def wait_filled_devices(nc: Client, timeout: float = 20.0) -> None:
    want = WORKSPACE_BYTES + SPARE

    async def free() -> dict[str, int | None]:
        """Free bytes of each node's device 0 in the KV (None while it is offline)."""
        out: dict[str, int | None] = {}
        for node in NODES:
            state = await kv_value(nc, DeviceState, keys.device_key(node, 0))
            if state is not None:
                out[node] = state.sample.memory_free_bytes if state.online else None
        return out

    def filled(got: dict[str, int | None]) -> bool:
        return len(got) == len(NODES) and all(
            f is not None and abs(f - want) < 2**20 for f in got.values()
        )

    await eventually(free, filled, timeout=timeout, what="devices reporting the filled state")


async def place(nc: Client, body: dict[str, object]) -> PlacementReply:
    msg = await nc.request("placement.request", json.dumps(body).encode(), timeout=20)
    reply = codec.decode(PlacementReply, msg.data, "json")
    assert reply.ok, reply.error
    return reply


def settled_at(generation: int) -> Callable[[InstanceState], bool]:
    """Generation ``generation`` loaded, failed or degraded: no stage still on its way."""
    return lambda s: s.generation == generation and s.state in ("loaded", "failed", "degraded")


def names_for(start: int, end: int) -> list[str]:
    return ckpt.stage_names(start, end, LAYERS)


async def test_planned_hf_model_loads_on_every_stage_and_moves_on_replan(
    nats_url: str, nc: Client, js: JetStreamContext, tmp_path: Path
) -> None:
    model = tmp_path / "tiny-llama"
    ckpt.write(model, layers=LAYERS, shards=2, hidden=256, vocab=2048, intermediate=512, grow=128)
    fleet = fleet_file(tmp_path / "fleet.toml")
    async with pipeline(nats_url, fleet) as workers:
        await wait_filled_devices(nc)
        request: dict[str, object] = {
            "model": f"hf:{model}",
            "instance_id": "tiny",
            "context_tokens": 16,
            "memory_headroom": 0.0,
        }
        reply = await place(nc, request)
        assert len(reply.stages) >= 3, reply.stages  # the fill forces a split
        state = await wait_instance(nc, "tiny", settled_at(reply.generation), timeout=30)
        assert state.state == "loaded", state
        for planned, st in zip(reply.stages, state.stages, strict=True):
            spec = StageSpec(
                planned.layer_start, planned.layer_end, planned.embeddings, planned.head
            )
            exact = stage_bytes(model, spec)
            assert st.state == "loaded" and st.where == "host"
            # The plan's weight_bytes is the bytes the stage loads, ends included, to the byte.
            assert st.bytes_loaded == exact == planned.weight_bytes, (st, planned)
        by_node: dict[str, list[str]] = {n: [] for n in NODES}
        for s in reply.stages:
            by_node[s.node] += names_for(s.layer_start, s.layer_end)
        for node, worker in workers.items():
            assert ckpt.held_names(worker) == sorted(by_node[node]), node

        # Re-plan without one of the nodes: its layers move, it gets a release and unloads.
        gone = reply.stages[0].node
        moved = await place(nc, {**request, "exclude_nodes": [gone]})
        assert moved.generation == reply.generation + 1
        assert gone not in {s.node for s in moved.stages}
        state = await wait_instance(nc, "tiny", settled_at(moved.generation), timeout=30)
        assert state.state == "loaded", state
        by_node = {n: [] for n in NODES}
        for s in moved.stages:
            by_node[s.node] += names_for(s.layer_start, s.layer_end)
        # The released node's unload may trail the others' loads.
        await eventually(
            workers[gone].tensor_names, lambda held: not held, timeout=20, what=f"{gone} unloaded"
        )
        for node, worker in workers.items():
            assert ckpt.held_names(worker) == sorted(by_node[node]), node


async def test_agent_telemetry_keeps_its_interval_while_its_worker_loads(
    nats_url: str,
    nc: Client,
    js: JetStreamContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real agent service (collector + its worker on one event loop): samples keep their
    interval during a load throttled to last ~1.5 s, and the simulated device reports the
    shard's memory as used once it is loaded."""
    root = tmp_path / "wide"
    ckpt.write(root, layers=4, hidden=256, vocab=512, intermediate=1024, grow=256)
    held = 4 * 1024**3
    a = msgspec.structs.replace(stage(root, "slow", 1, "solo", 0, 1, 0, 4, 4), memory_bytes=held)
    monkeypatch.setenv("SHARDPLANE_LOAD_LIMIT_MBPS", str(a.weight_bytes / 1.5 / 1e6))
    fleet = tmp_path / "solo.toml"
    fleet.write_text('interval_s = 0.1\n[[nodes]]\nname = "solo"\ngpus = [{ model = "A10" }]\n')
    interval = 0.1
    samples: list[DeviceSample] = []
    first = asyncio.Event()

    async def on_sample(msg: Msg) -> None:
        samples.append(codec.decode(DeviceSample, msg.data))
        first.set()

    sub = await nc.subscribe(subjects.gpu_sample("solo", 0), cb=on_sample)
    log = await StatusLog().start(nc)
    stop = asyncio.Event()
    agent_nc = await nats.connect(nats_url)
    agent = asyncio.create_task(run_agents(agent_nc, stop=stop, fleet=fleet, interval_s=interval))
    try:
        await asyncio.wait_for(first.wait(), timeout=10)
        await authorize(js, a)  # run_agents' workers act only on the ledger's generation
        await assign(js, a)
        final = (await log.settled("slow", 1, 1))[0]
        assert final.state == "loaded" and final.bytes_loaded == a.weight_bytes
        assert final.load_ms > 1000, final
        ended = final.ts
        started = ended - final.load_ms / 1000.0
        # The first sample taken a full interval after the load: every sample of the load's
        # window has arrived by then (one pending sample per device, sent in order).
        after = await until_sample_after(samples, ended + interval)
        assert_interval_kept(samples, started, ended, interval)
        before = max((s for s in samples if s.ts < started), key=lambda s: s.seq)
        used_before, used_after = before.memory_used_bytes or 0, after.memory_used_bytes or 0
        assert used_after - used_before > 0.75 * held, (used_before, used_after)
    finally:
        stop.set()
        await asyncio.wait_for(agent, timeout=20)
        await agent_nc.close()
        await sub.unsubscribe()
        await log.stop()
