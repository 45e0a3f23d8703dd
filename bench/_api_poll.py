"""The soak's API client, a process of its own: ``GET URL`` once a second, one line per answer.

Why a process: the soak's own process also follows every KV write of 8,000 devices (~4,000 a
second) to measure lag, and nats-py hands such a subscription's backlog to its callback in
one go, without yielding: measured with a probe on every event-loop callback (3-minute soak,
load 3.3), that process ran 336 callbacks of 5-32 ms draining it, and 359 of its reader. A
client reading a 12 MB list on that loop waited behind them, so the soak's figure for the API
held the soak's own lag bookkeeping. A user's client is a process of its own; so is this one.

Each line is ``OK MS HEAD_MS``: ``OK`` 1 for a 200 read whole, 0 for a failure; ``MS`` the
whole request, ``HEAD_MS`` until its headers came (nan on failure), both milliseconds. Run as
``python -m shardplane.bench._api_poll URL [EVERY_S]``; it stops when its stdin closes.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time

import aiohttp


async def _one(http: aiohttp.ClientSession, url: str) -> tuple[bool, float, float]:
    t0 = time.perf_counter()
    head = math.nan
    try:
        async with http.get(url) as resp:
            head = (time.perf_counter() - t0) * 1000
            await resp.read()
            ok = resp.status == 200
    except Exception:  # any failure is one failed request, not the end of the client
        ok = False
    return ok, (time.perf_counter() - t0) * 1000, head


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()


async def poll(url: str, every_s: float) -> None:
    closed = asyncio.ensure_future(_stdin_closed())
    async with aiohttp.ClientSession() as http:
        while not closed.done():
            ok, ms, head = await _one(http, url)
            sys.stdout.write(f"{int(ok)} {ms:.3f} {head:.3f}\n")
            sys.stdout.flush()
            await asyncio.wait({closed}, timeout=every_s)


def main(argv: list[str]) -> int:
    url = argv[0]
    every_s = float(argv[1]) if len(argv) > 1 else 1.0
    asyncio.run(poll(url, every_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
