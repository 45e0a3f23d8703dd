"""Workers at fleet scale over a real nats-server: more workers than the server allows consumers
on one stream (1,000; a consumer per node fails with JetStream error 10026) all get their
assignments through one shared consumer per process (``agents.assignments``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from shardplane.agents.assignments import AssignmentFeed, filter_for, split_batches
from shardplane.agents.worker import Worker
from shardplane.bus import authority, streams, subjects
from shardplane.bus.messages import ShardAssignment
from shardplane.bus.streams import LEDGER, LEDGER_RESERVATIONS_KEY
from shardplane.cli import part_arg
from tests.agents.busutil import StatusLog, assign
from tests.kit import eventually

SERVER_CONSUMER_LIMIT = 1000  # nats-server's per-stream default, measured below


def reserve(node: str, instance: str, generation: int = 1) -> ShardAssignment:
    """A catalog-model stage: the worker reserves memory and reads nothing (cheap at scale)."""
    return ShardAssignment(
        instance_id=instance,
        generation=generation,
        node=node,
        model="llama-3.1-70b",
        device=f"{node}/0",
        layer_start=0,
        layer_end=80,
        weight_bytes=2**30,
        memory_bytes=2**30,
    )


@contextlib.asynccontextmanager
async def fleet_workers(nc: Client, nodes: list[str]) -> AsyncGenerator[dict[str, Worker], None]:
    stop = asyncio.Event()
    feed = AssignmentFeed(nc, nodes)
    running = {
        n: Worker(nc, node=n, use_cuda=False, inbox=feed.inbox(n), verify_generations=False)
        for n in nodes
    }
    tasks = [asyncio.create_task(feed.run(stop))]
    tasks += [asyncio.create_task(w.run(stop)) for w in running.values()]
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)


async def consumers(js: JetStreamContext) -> int:
    try:
        return (await js.stream_info(streams.PLACEMENTS)).state.consumer_count
    except NotFoundError:  # not provisioned yet
        return 0


def test_pure_helpers() -> None:
    assert filter_for(["a"]) == ["placement.assigned.a"]
    assert filter_for(["b", "a", "b"]) == ["placement.assigned.a", "placement.assigned.b"]
    assert filter_for([f"n{i}" for i in range(300)]) == ["placement.assigned.*"]
    runs = split_batches([("a", 1, "x"), ("b", 2, "y"), ("a", 3, "z"), ("a", 4, "w")], 3)
    assert runs == {"a": [(["x", "z"], False), (["w"], True)], "b": [(["y"], False)]}


def test_part_of_a_fleet() -> None:
    assert part_arg("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1", "0/0", "-1/2"):
        with pytest.raises(argparse.ArgumentTypeError):
            part_arg(bad)


async def make_consumers(js: JetStreamContext, stream: str, subject: str, count: int) -> int:
    """Create up to ``count`` consumers on ``stream``; how many the server accepted."""
    made = 0
    try:
        for made in range(count):
            await js.add_consumer(
                stream,
                durable_name=f"limit-{made}",
                filter_subject=f"{subject}.limit-{made}",
                inactive_threshold=30.0,
                mem_storage=True,
            )
        made = count
    except BadRequestError as exc:
        assert exc.err_code == 10026, exc
    for i in range(made):
        await js.delete_consumer(stream, f"limit-{i}")
    return made


async def test_the_server_limit_is_real_and_placements_raise_it(js: JetStreamContext) -> None:
    """The reason for the shared feed: left to the server's default, a stream takes 1,000
    consumers. PLACEMENTS states a higher limit, for fleets of real hosts (one agent each)."""
    await js.add_stream(name="LIMITED", subjects=["limited.>"])
    assert await make_consumers(js, "LIMITED", "limited", 1001) == SERVER_CONSUMER_LIMIT
    await streams.provision(js)
    assert await make_consumers(js, streams.PLACEMENTS, "placement.assigned", 1001) == 1001


async def run_fleet(nc: Client, js: JetStreamContext, count: int, timeout: float) -> None:
    await streams.provision(js)
    nodes = [f"fleet-{i:05d}" for i in range(count)]
    log = await StatusLog().start(nc)
    before = await consumers(js)
    async with fleet_workers(nc, nodes):
        for node in nodes:
            await assign(js, reserve(node, f"i-{node}"))

        def all_reserved(lg: StatusLog) -> bool:
            return len({s.node for s in lg.items if s.state == "reserved"}) == count

        await log.wait(f"{count} workers to reserve", all_reserved, timeout=timeout)
        assert await consumers(js) == before + 1  # one consumer for the whole process
    await log.stop()


async def test_more_workers_than_the_consumer_limit_get_their_assignments(
    nc: Client, js: JetStreamContext
) -> None:
    await run_fleet(nc, js, SERVER_CONSUMER_LIMIT + 100, timeout=120.0)


@pytest.mark.slow
async def test_eight_thousand_workers_in_one_process(nc: Client, js: JetStreamContext) -> None:
    await run_fleet(nc, js, 8000, timeout=600.0)


async def test_a_restarted_process_rebuilds_from_history_and_acts_once(
    nc: Client, js: JetStreamContext
) -> None:
    """History (published while no worker ran) is folded before acting: generation 1, already
    replaced by generation 2, is never reserved; a poison message in history is not parked
    again on each start, while a live one is parked once."""
    await streams.provision(js)
    await assign(js, reserve("h1", "hist", 1))
    await assign(js, reserve("h1", "hist", 2))
    await js.publish(subjects.assigned("h1"), b"not an assignment")
    dead = await js.pull_subscribe(subjects.deadletter(subjects.assigned(">")), stream="DEADLETTER")
    log = await StatusLog().start(nc)
    async with fleet_workers(nc, ["h1", "h2"]):
        await log.settled("hist", 2, 1, states=("reserved",))
        await js.publish(subjects.assigned("h2"), b"poison, live")
        await assign(js, reserve("h2", "after", 1))
        await log.settled("after", 1, 1, states=("reserved",))
    assert log.of("hist", 1) == []
    parked = await dead.fetch(10, timeout=5.0)
    assert [m.data for m in parked] == [b"poison, live"]
    await log.stop()


async def test_the_feed_survives_its_consumer_being_deleted(
    nc: Client, js: JetStreamContext
) -> None:
    await streams.provision(js)
    log = await StatusLog().start(nc)
    async with fleet_workers(nc, ["d1"]):
        await assign(js, reserve("d1", "one"))
        await log.settled("one", 1, 1, states=("reserved",))
        infos = [c async for c in consumer_infos(js)]
        assert len(infos) == 1
        await js.delete_consumer(streams.PLACEMENTS, infos[0])
        await assign(js, reserve("d1", "two"))
        await log.settled("two", 1, 1, states=("reserved",), timeout=30.0)
    assert len(log.of("one", 1)) == 2  # reserved, then unloaded on stop: not reserved twice
    await log.stop()


async def consumer_infos(js: JetStreamContext) -> AsyncIterator[str]:
    for info in await js.consumers_info(streams.PLACEMENTS):
        assert info.name is not None
        yield info.name


@pytest.mark.slow
def test_agent_processes_for_1000_nodes_by_8_gpus(nats_url: str, tmp_path: Path) -> None:
    """The full size: two agent processes share 1,000 simulated nodes x 8 GPUs; each gets one
    consumer, and every node's worker answers an assignment."""
    fleet = tmp_path / "big.toml"
    fleet.write_text(big_fleet(1000))
    env = {**os.environ, "NATS_URL": nats_url}
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "shardplane.cli", "agent", "--fleet", str(fleet)),
                *("--part", f"{i}/2", "--interval", "5"),
            ],
            env=env,
        )
        for i in range(2)
    ]
    try:
        asyncio.run(_assign_all(nats_url, 1000))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            assert p.wait(timeout=60) == 0


async def _assign_all(url: str, count: int) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    await eventually(
        lambda: consumers(js), lambda n: n >= 2, timeout=300, what="2 agent processes subscribed"
    )
    await run_fleet_assign(nc, js, count)
    assert await consumers(js) == 2
    await nc.close()


async def run_fleet_assign(nc: Client, js: JetStreamContext, count: int) -> None:
    log = await StatusLog().start(nc)
    nodes = [f"big-{i:0{len(str(count - 1))}d}" for i in range(count)]
    # Standing in for the planner, which commits a generation before it publishes it: the
    # agents' workers act only on what the ledger names (bus.authority).
    view = authority.LedgerView(
        instances={f"b-{n}": authority.LedgerInstance(generation=1) for n in nodes}
    )
    ledger_kv = await js.key_value(LEDGER)
    await ledger_kv.put(LEDGER_RESERVATIONS_KEY, msgspec.msgpack.encode(view))
    for node in nodes:
        await assign(js, reserve(node, f"b-{node}"))

    def all_reserved(lg: StatusLog) -> bool:
        return len({s.node for s in lg.items if s.state == "reserved"}) == count

    await log.wait(f"{count} nodes to reserve", all_reserved, timeout=300.0)
    await log.stop()


def big_fleet(nodes: int) -> str:
    return f'[[nodes]]\nname = "big"\ncount = {nodes}\ngpus = [{{ model = "A100", count = 8 }}]\n'
