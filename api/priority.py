"""Requests first: the background work of the API gives way while a large body is sent.

Why: at 8,000 devices the watch applies ~4,000 changes a second, in slices of the event loop,
and a list answer (~12 MB) needs dozens of loop turns to go out, one per time the client's
socket has room again. Each turn waited behind a slice of the watch, the nats-py reader and the
liveness pass, so on a busy machine (the soak: nine processes on two cores) the device list
took 100-200 ms where it needs ~15 ms on its own. While a large body is being sent, the watch
and the liveness pass wait for it (the nats-py reader still runs, buffering what arrives),
then catch up: the view falls behind by the length of a send, well inside the lists' own
staleness bound (LIST_MAX_AGE_S). The wait is bounded both ways: at most ``max_wait_s`` at a
time, and after a wait that ran out, none for as long again, so a client that keeps the API
sending all the time still leaves the watch half of the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager

from shardplane.bus.wait import wait_set

MAX_WAIT_S = 0.1


class RequestsFirst:
    def __init__(
        self, max_wait_s: float = MAX_WAIT_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_wait_s = max_wait_s
        self.clock = clock
        self.in_flight = 0
        self.waits = 0  # times background work gave way
        self._idle = asyncio.Event()
        self._idle.set()
        self._unhindered_until = 0.0

    @contextmanager
    def sending(self) -> Generator[None]:
        """Around the writing of one large body."""
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    def should_wait(self) -> bool:
        """Cheap enough to ask before every change applied."""
        return self.in_flight > 0 and self.clock() >= self._unhindered_until

    async def give_way(self) -> None:
        """Wait until no large body is being sent, at most ``max_wait_s``; after a wait that ran
        out, background work runs unhindered for ``max_wait_s``."""
        if not self.should_wait():
            return
        self.waits += 1
        if not await wait_set(self._idle, self.max_wait_s):
            self._unhindered_until = self.clock() + self.max_wait_s
