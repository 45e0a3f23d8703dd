from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from shardplane.api.server import make_app, start_app
from shardplane.bus.streams import cluster_state
from tests.api.fleet import write_fleet
from tests.planner.ready import wait_serving


@pytest.fixture
async def kv(js: JetStreamContext) -> KeyValue:
    return await cluster_state(js)


@pytest.fixture
async def fleet_kv(kv: KeyValue) -> KeyValue:
    await write_fleet(kv)
    return kv


@pytest.fixture
async def api_url(nc: Client, fleet_kv: KeyValue) -> AsyncIterator[str]:
    """The real API on a free port, watching the real bucket the fleet was written to."""
    runner, url = await start_app(make_app(nc, request_timeout_s=20.0))
    yield url
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def planner(nats_url: str, js: JetStreamContext) -> AsyncIterator[None]:
    """The real planner service on its own connection, as ``shardplane up`` runs it."""
    from shardplane.planner.service import run_planner

    client = await nats.connect(nats_url)
    stop = asyncio.Event()
    task = asyncio.create_task(run_planner(client, stop=stop))
    try:
        # Wait until its placement.request endpoint is subscribed ($SRV.PING answers before).
        await wait_serving(client, task)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await client.drain()
