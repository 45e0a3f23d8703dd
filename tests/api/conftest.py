from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from shardplane.api.server import make_app, start_app
from shardplane.bus.streams import cluster_state
from tests.api.fleet import write_fleet
from tests.planner.ready import planner_running


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
    async with planner_running(nats_url):
        yield
