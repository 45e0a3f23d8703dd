"""Noticing a KV watch that silently stopped delivering, and restarting it.

A KV watch is an ordered push consumer. When the server it lives on is lost (kill -9 of the
stream's leader, typically), nothing tells the client: nats-py notices only after two missed
idle heartbeats (10 s) and then tries once to recreate the consumer; if that try falls in the
cluster's election, the watch stays dead for good. A reader fed by it (the planner's fleet
cache, the API's) would serve a frozen view and never know.

:func:`guard_watch` asks the bucket's stream every second for its last sequence: when the
stream has moved past what the reader applied and the reader has not moved for ``stall_s``,
the watch is stopped so its owner watches again (a fresh watch replays the newest value of
every key, so nothing is missed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext

log = logging.getLogger(__name__)

STALL_S = 1.5
INTERVAL_S = 0.5


async def stream_head(js: JetStreamContext, stream: str, timeout_s: float | None = None) -> int:
    """The stream's last sequence. A KV bucket's revisions are its stream's sequences, so for
    a bucket this is the newest revision a watch has to apply to hold every write made so far
    (a LAST_PER_SUBJECT replay always delivers the stream's last message)."""
    info = await asyncio.wait_for(js.stream_info(stream), timeout_s)
    return info.state.last_seq or 0


async def guard_watch(
    js: JetStreamContext,
    stream: str,
    applied: Callable[[], int],
    restart: Callable[[], Awaitable[None]],
    *,
    what: str,
    interval_s: float = INTERVAL_S,
    stall_s: float = STALL_S,
) -> None:
    """Forever (cancel to end): call ``restart`` when ``stream`` is ahead of ``applied()`` (the
    highest stream sequence the reader has applied) and ``applied()`` has not moved for
    ``stall_s``."""
    stalled_since: float | None = None
    last = applied()
    while True:
        await asyncio.sleep(interval_s)
        try:
            head = await stream_head(js, stream)
        except Exception:  # the stream is electing a leader: nothing to judge by yet
            continue
        now, seen = time.monotonic(), applied()
        if head > seen and seen == last:
            stalled_since = stalled_since or now
            if now - stalled_since >= stall_s:
                log.warning(
                    "%s: the watch on %s is stuck at %d while the stream is at %d; watching again",
                    what,
                    stream,
                    seen,
                    head,
                )
                stalled_since = None
                try:
                    await asyncio.wait_for(restart(), 5.0)
                except Exception as exc:  # next round tries again
                    log.warning("%s: restarting the watch failed: %r", what, exc)
        else:
            stalled_since = None
        last = seen
