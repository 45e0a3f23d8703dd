"""Requests first (api.priority): background work waits for a large body, but never for long."""

from __future__ import annotations

import asyncio
import time

from shardplane.api.priority import RequestsFirst


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_nothing_sent_nothing_waits() -> None:
    first = RequestsFirst(max_wait_s=5.0)
    assert not first.should_wait()
    t0 = time.monotonic()
    await first.give_way()
    assert time.monotonic() - t0 < 1.0 and first.waits == 0


async def test_background_work_resumes_when_the_body_is_sent() -> None:
    first = RequestsFirst(max_wait_s=30.0)
    order: list[str] = []

    async def background() -> None:
        await first.give_way()
        order.append("background")

    with first.sending():
        assert first.should_wait()
        task = asyncio.create_task(background())
        await asyncio.sleep(0.05)
        assert order == []  # still waiting for the body
        order.append("sent")
    await asyncio.wait_for(task, 10.0)
    assert order == ["sent", "background"] and first.waits == 1 and not first.should_wait()


async def test_a_wait_that_runs_out_buys_as_long_unhindered() -> None:
    """A client that keeps the API sending cannot stop the watch: after a wait of
    ``max_wait_s`` that ran out, nothing waits for as long again."""
    clock = Clock()
    first = RequestsFirst(max_wait_s=0.05, clock=clock)
    with first.sending():
        with first.sending():  # two at once: both must end before the wait does
            pass
        assert first.should_wait()
        await asyncio.wait_for(first.give_way(), 10.0)  # ran out after 0.05 s
        assert not first.should_wait()
        clock.now += 0.049
        assert not first.should_wait()
        clock.now += 0.002
        assert first.should_wait()
    assert not first.should_wait() and first.in_flight == 0
