from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.bus.streams import provision
from tests.natsfixture import real_nats_server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run slow scale tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("SHARDPLANE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow scale test: run with --runslow or SHARDPLANE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def nats_server_url() -> Iterator[str]:
    with real_nats_server() as url:
        yield url


async def _wipe(url: str) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for name in await js.streams_info():
            await js.delete_stream(name.config.name or "")
    finally:
        await nc.close()


@pytest.fixture
async def nats_url(nats_server_url: str) -> str:
    """A real server with no streams or buckets left over from an earlier test."""
    await _wipe(nats_server_url)
    return nats_server_url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


@pytest.fixture
async def js(nc: Client) -> JetStreamContext:
    jsc = nc.jetstream()
    await provision(jsc)
    return jsc
