"""The raw NATS floor the live benchmarks set their timings beside: round trips of an empty
request to an echo responder on the same connection, nothing of ours in the path. One piece, so
every bench's "floor" means the same thing."""

from __future__ import annotations

import time

from nats.aio.client import Client
from nats.aio.msg import Msg


async def echo_round_trips_ms(nc: Client, subject: str, count: int) -> list[float]:
    """``count`` request-reply round trips on ``subject`` (unused by anything else), in ms."""

    async def echo(msg: Msg) -> None:
        await msg.respond(b"")

    sub = await nc.subscribe(subject, cb=echo)
    times: list[float] = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            await nc.request(subject, b"", timeout=5)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        await sub.unsubscribe()
    return times
