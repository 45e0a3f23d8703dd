"""kv-feed: what following a whole KV bucket costs its reader, per change, three ways.

The API and the planner each follow every change of ``cluster_state``: ~4,000 a second at
8,000 devices sampled every 2 s. A bucket of ``--changes`` keys is written into a private
nats-server first; each way then replays it from a fresh watch and takes every change, timed
(process CPU and wall) to the last one:

1. ``watchall_iter``: nats-py's ``kv.watchall()`` read with ``async for`` (the API before);
2. ``watchall_updates``: the same watcher read with ``updates(timeout=1.0)`` (the planner
   before: a ``wait_for`` per change);
3. ``kv_feed``: bus.kvfeed (changes taken off nats-py's reader, drained in the API's slices
   by ``KvFeed.drain``, the loop the API and the planner apply their changes with).

Each way runs ``--rounds`` times, alternating; the figures are medians. The floor is the first
way: the ratios say what the feed saves against it.

Run: ``shardplane bench kv-feed [--quick] [-- --changes 40000 --rounds 3]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import nats
from nats.js import JetStreamContext

from shardplane.api.hub import LOOP_SLICE_S
from shardplane.bus.kvfeed import KvFeed, Update
from shardplane.bus.streams import kv_subject
from shardplane.natsserver import NatsServer

BUCKET = "bench_feed"
VALUE = b"x" * 1400  # about one device's DeviceState


async def watchall_iter(js: JetStreamContext, count: int) -> None:
    watcher = await (await js.key_value(BUCKET)).watchall()
    taken = 0
    async for entry in watcher:
        taken += entry is not None
        if taken == count:
            break
    await watcher.stop()


async def watchall_updates(js: JetStreamContext, count: int) -> None:
    watcher = await (await js.key_value(BUCKET)).watchall()
    taken = 0
    while taken < count:
        taken += await watcher.updates(timeout=1.0) is not None
    await watcher.stop()


async def kv_feed(js: JetStreamContext, count: int) -> None:
    feed = await KvFeed.start(js, BUCKET)
    taken = 0

    def apply(update: Update) -> None:
        nonlocal taken
        taken += 1

    synced = asyncio.Event()  # the bucket holds ``count`` keys: the marker follows the last
    await feed.drain(apply, synced.set, slice_s=LOOP_SLICE_S, stop=synced)
    await feed.stop()
    if taken != count:
        raise RuntimeError(f"the feed replayed {taken} changes of {count}")


WAYS: dict[str, Callable[[JetStreamContext, int], Awaitable[None]]] = {
    "watchall_iter": watchall_iter,
    "watchall_updates": watchall_updates,
    "kv_feed": kv_feed,
}


async def measure(url: str, count: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (CPU us, wall us) per change, by way."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.create_key_value(bucket=BUCKET, history=1)
    acks = [js.publish(kv_subject(BUCKET, f"devices.n{i}.0"), VALUE) for i in range(count)]
    for at in range(0, count, 1000):
        await asyncio.gather(*acks[at : at + 1000])
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
    for _ in range(rounds):
        for name, way in WAYS.items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.wait_for(way(js, count), 120.0)
            samples[name].append(
                (
                    (time.process_time() - cpu0) / count * 1e6,
                    (time.perf_counter() - wall0) / count * 1e6,
                )
            )
    await nc.close()
    return {
        name: (statistics.median(c for c, _ in got), statistics.median(w for _, w in got))
        for name, got in samples.items()
    }


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench kv-feed")
    parser.add_argument("--changes", type=int, default=5000 if quick else 40000)
    parser.add_argument("--rounds", type=int, default=1 if quick else 3)
    args = parser.parse_args(argv or [])
    if args.changes < 1 or args.rounds < 1:
        parser.error(f"--changes ({args.changes}) and --rounds ({args.rounds}) must be positive")
    with NatsServer() as server:
        figures = asyncio.run(measure(server.url, args.changes, args.rounds))
    floor_cpu = figures["watchall_iter"][0]
    print(f"{args.changes} changes replayed, median of {args.rounds} round(s) per way")
    print(f"{'way':<20}{'CPU us/change':>15}{'wall us/change':>16}{'CPU / floor':>13}")
    for name, (cpu, wall) in figures.items():
        print(f"{name:<20}{cpu:>15.2f}{wall:>16.2f}{cpu / floor_cpu:>13.2f}")
    out: dict[str, object] = {"changes": args.changes, "rounds": args.rounds}
    for name, (cpu, wall) in figures.items():
        out[f"{name}_cpu_us"] = round(cpu, 2)
        out[f"{name}_wall_us"] = round(wall, 2)
    out["feed_cpu_over_floor"] = round(figures["kv_feed"][0] / floor_cpu, 3)
    out["feed_cpu_over_updates"] = round(figures["kv_feed"][0] / figures["watchall_updates"][0], 3)
    print(json.dumps(out))
    return 0
