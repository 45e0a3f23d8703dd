"""Controller replicas: one active by the KV lease, a standby takes over when it stops."""

from __future__ import annotations

import asyncio
import logging

import nats
import pytest

from shardplane.planner.controller import Controller
from tests.kit import until_logged

LEASE_LOG = "shardplane.bus.lease"


async def test_one_controller_leads_and_a_standby_takes_over(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LEASE_LOG)
    clients = [await nats.connect(nats_url) for _ in range(2)]
    stops = [asyncio.Event(), asyncio.Event()]
    controllers = [Controller(c) for c in clients]
    tasks = [asyncio.create_task(c.run(s)) for c, s in zip(controllers, stops, strict=True)]
    try:
        await asyncio.wait_for(
            asyncio.wait(
                [asyncio.create_task(c.leading.wait()) for c in controllers],
                return_when=asyncio.FIRST_COMPLETED,
            ),
            20,
        )
        # The marker: the other replica has asked for the lease and been told to stand by.
        await until_logged(caplog, LEASE_LOG, "is standing by", timeout=20)
        leaders = [i for i, c in enumerate(controllers) if c.leading.is_set()]
        assert len(leaders) == 1, leaders
        first = leaders[0]
        other = 1 - first
        stops[first].set()
        await asyncio.wait_for(tasks[first], 20)
        # A graceful stop gives the lease up: the standby leads well within the lease TTL.
        await asyncio.wait_for(controllers[other].leading.wait(), 5)
    finally:
        for s in stops:
            s.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        for c in clients:
            await c.drain()
