"""A projector task that is cancelled stops: Python 3.11's ``asyncio.wait_for`` swallows a
cancel that arrives as the awaited event is set, and a puller that swallowed its cancel kept a
graceful stop (and so the lease) waiting 30 s in the two-replica takeover test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from shardplane.bus.wait import wait_set

Waiter = Callable[[asyncio.Event, float], Awaitable[object]]


async def _set_and_cancel_at_once(wait: Waiter) -> str:
    event = asyncio.Event()

    async def waiter() -> str:
        await wait(event, 10.0)
        return "ran on"

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the waiter is inside its wait
    event.set()
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


async def _wait_for(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)


async def test_wait_set_is_cancelled_even_as_its_event_is_set() -> None:
    assert await _set_and_cancel_at_once(wait_set) == "cancelled"


async def test_the_premise_wait_for_can_swallow_that_cancel() -> None:
    """Why wait_set exists; on Python 3.12+ wait_for is fixed and this premise no longer holds."""
    import sys

    if sys.version_info >= (3, 12):
        pytest.skip("asyncio.wait_for keeps every cancel from Python 3.12 on")
    assert await _set_and_cancel_at_once(_wait_for) == "ran on"


async def test_wait_set_times_out_and_reports_the_event() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    event.set()
    assert await wait_set(event, 0.01) is True
