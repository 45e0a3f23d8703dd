"""Plumbing for the projector tests: a projector on its own connection and typed KV reads (the
message factories and the wait are the kit's: tests/kit.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import TypeVar

import msgspec
import nats
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from shardplane.bus import keys
from shardplane.bus.messages import (
    DeviceState,
    InstanceState,
    NodeState,
)
from shardplane.bus.streams import cluster_state
from shardplane.projector.partition import Partition
from shardplane.projector.service import Projector, ProjectorConfig
from tests.kit import assignment, heartbeat, sample, status

__all__ = [
    "assignment",
    "heartbeat",
    "sample",
    "status",
]  # the kit's factories, as these tests know them

T = TypeVar("T")
# These tests publish assignments by hand, without a planner and its ledger: no generation
# check (tests/projector/test_authority.py runs with it).
FAST = ProjectorConfig(
    ack_wait_s=2.0, lease_ttl_s=1.5, sweep_interval_s=0.2, verify_generations=False
)


@contextlib.asynccontextmanager
async def running(
    url: str, config: ProjectorConfig = FAST, part: Partition | None = None
) -> AsyncGenerator[tuple[Projector, asyncio.Event, asyncio.Task[None]], None]:
    """A projector task on its own connection that leads (waits until it does): the runner, its
    stop event and its task. Stopped on exit, if the caller has not stopped it already."""
    client = await nats.connect(url)
    stop = asyncio.Event()
    runner = Projector(client, config) if part is None else Projector(client, config, part)
    task = asyncio.create_task(runner.run(stop))
    try:
        await asyncio.wait_for(runner.leading.wait(), 20)
        yield runner, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await client.drain()


@contextlib.asynccontextmanager
async def projector(url: str, config: ProjectorConfig = FAST) -> AsyncGenerator[Projector, None]:
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
