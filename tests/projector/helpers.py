"""Plumbing for the projector tests: a projector on its own connection, typed KV reads,
message builders, and a poll-until helper."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import msgspec
import nats
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from shardplane.bus import keys
from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    InstanceState,
    NodeHeartbeat,
    NodeState,
    ShardAssignment,
    ShardStatus,
)
from shardplane.bus.streams import cluster_state
from shardplane.projector.service import Projector, ProjectorConfig

T = TypeVar("T")
# These tests publish assignments by hand, without a planner and its ledger: no generation
# check (tests/projector/test_authority.py runs with it).
FAST = ProjectorConfig(
    ack_wait_s=2.0, lease_ttl_s=1.5, sweep_interval_s=0.2, verify_generations=False
)


@contextlib.asynccontextmanager
async def running(
    url: str, config: ProjectorConfig = FAST
) -> AsyncIterator[tuple[Projector, asyncio.Event, asyncio.Task[None]]]:
    """A projector task on its own connection that leads (waits until it does): the runner, its
    stop event and its task. Stopped on exit, if the caller has not stopped it already."""
    client = await nats.connect(url)
    stop = asyncio.Event()
    runner = Projector(client, config)
    task = asyncio.create_task(runner.run(stop))
    try:
        await asyncio.wait_for(runner.leading.wait(), 20)
        yield runner, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await client.drain()


@contextlib.asynccontextmanager
async def projector(url: str, config: ProjectorConfig = FAST) -> AsyncIterator[Projector]:
    """A projector task that leads (waits until it does) and is stopped on exit."""
    async with running(url, config) as (runner, _, _):
        yield runner


async def get(nc: Client, kind: type[T], key: str) -> T | None:
    kv = await cluster_state(nc.jetstream())
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return msgspec.msgpack.decode(entry.value or b"", type=kind)


async def device(nc: Client, node: str, index: int) -> DeviceState | None:
    return await get(nc, DeviceState, keys.device_key(node, index))


async def node_state(nc: Client, node: str) -> NodeState | None:
    return await get(nc, NodeState, keys.node_key(node))


async def instance(nc: Client, instance_id: str) -> InstanceState | None:
    return await get(nc, InstanceState, keys.instance_key(instance_id))


async def until(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 15.0
) -> T:
    deadline = time.monotonic() + timeout
    last = await probe()
    while not ok(last):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s; last: {last!r}")
        await asyncio.sleep(0.05)
        last = await probe()
    return last


def sample(node: str, index: int, seq: int, **fields: object) -> DeviceSample:
    return DeviceSample(
        node=node,
        index=index,
        uuid=f"GPU-{node}-{index}",
        seq=seq,
        ts=fields.pop("ts", time.time()),  # pyright: ignore[reportArgumentType]
        memory_total_bytes=80 * 2**30,
        memory_free_bytes=fields.pop("free", 70 * 2**30),  # pyright: ignore[reportArgumentType]
        **fields,  # pyright: ignore[reportArgumentType]
    )


def heartbeat(node: str, seq: int, **fields: object) -> NodeHeartbeat:
    return NodeHeartbeat(node=node, seq=seq, ts=time.time(), **fields)  # pyright: ignore[reportArgumentType]


def assignment(
    instance_id: str, generation: int, node: str, stage: int, count: int, **fields: object
) -> ShardAssignment:
    return ShardAssignment(
        instance_id=instance_id,
        generation=generation,
        node=node,
        model="llama-3.1-8b",
        stage=stage,
        stage_count=count,
        device=f"{node}/0",
        layer_start=stage * 10,
        layer_end=stage * 10 + 10,
        ts=time.time(),
        **fields,  # pyright: ignore[reportArgumentType]
    )


def status(
    instance_id: str, generation: int, node: str, stage: int, state: str, seq: int, **fields: object
) -> ShardStatus:
    return ShardStatus(
        instance_id=instance_id,
        generation=generation,
        node=node,
        stage=stage,
        state=state,  # pyright: ignore[reportArgumentType]
        seq=seq,
        ts=time.time(),
        **fields,  # pyright: ignore[reportArgumentType]
    )
