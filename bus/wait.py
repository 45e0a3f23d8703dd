"""Waiting for a stop (or any event) with a deadline, without losing a cancellation.

Every service loop sleeps "until the next round or until stopped". The obvious spelling,
``asyncio.wait_for(stop.wait(), t)`` under ``suppress(TimeoutError)``, can swallow a
cancellation on Python 3.11 when it arrives as the event is set (fixed in 3.12): the task runs on
and a graceful stop waits for it (a 30 s projector handover was seen). This is the one spelling.
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``event``; True when it is set. A cancel always propagates."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return event.is_set()
