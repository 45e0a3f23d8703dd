"""agent-overhead: what the telemetry agent costs its host.

1. CPU time of the collector per cycle (8 simulated devices: read, stamp, encode, publish with
   Nats-Msg-Id and wait for the JetStream acks), run through the real scheduler loop against an
   embedded nats-server, and as percent of one core at a 2 s interval. The floor, measured in
   the same run, is the bare cost of publishing the same 9 messages per cycle with
   ``js.publish_async`` (no reading, no encoding, no scheduling).
2. Backend initialisation when no GPU library is present (NVML and ROCm probed and skipped),
   in a fresh interpreter (imports included: that is what an agent start pays), next to the
   floor of a fresh interpreter that only imports msgspec.

Run: ``shardplane bench agent-overhead [--quick]``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

from shardplane.agents.collector import CollectorConfig, run_collectors
from shardplane.agents.fleet import parse
from shardplane.agents.publisher import Publisher
from shardplane.agents.service import sim_collectors

INTERVAL_S = 2.0
TARGET_CPU_PCT = 1.0
TARGET_INIT_S = 0.5

FLEET_8 = 'seed = 1\n[[nodes]]\nname = "bench"\ngpus = [{ model = "H100-SXM", count = 8 }]\nnvlink = [[0, 1], [2, 3], [4, 5], [6, 7]]\n'

_INIT_SNIPPET = (
    "import time; t = time.perf_counter();"
    "from agents.factory import select_backend; s = select_backend('bench');"
    "print(time.perf_counter() - t, s.backend.name)"
)
_FLOOR_SNIPPET = (
    "import time; t = time.perf_counter(); import msgspec; print(time.perf_counter() - t)"
)


async def _collector_cpu(url: str, cycles: int, loop_interval_s: float) -> tuple[float, float, int]:
    """(CPU s per cycle through the real loop, floor CPU s per cycle, messages per cycle)."""
    import nats

    from shardplane.bus.streams import provision

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await provision(js)
        publisher = Publisher(nc)
        fleet = parse(FLEET_8)
        config = CollectorConfig(interval_s=INTERVAL_S)
        collectors, _ = sim_collectors(fleet, publisher, config)
        # Warm up: first publishes create the async reply subscription and caches.
        for _ in range(5):
            collectors[0].tick()
            await publisher.flush_once()

        stop = asyncio.Event()
        runner = asyncio.create_task(publisher.run(stop))
        before_ticks = collectors[0].ticks
        t0 = time.process_time()
        loop = asyncio.create_task(run_collectors(collectors, stop, loop_interval_s))
        await asyncio.sleep(cycles * loop_interval_s)
        stop.set()
        await loop
        await publisher.drain(5.0)
        cpu = time.process_time() - t0
        await runner
        done = collectors[0].ticks - before_ticks
        per_cycle = cpu / max(1, done)
        msgs = 9

        # Floor: the same number of messages of the same size, published and acked, nothing else.
        payload = b"x" * 700
        t0 = time.process_time()
        for c in range(cycles):
            futures = [
                await js.publish_async(
                    f"telemetry.gpu.floor.{i}", payload, headers={"Nats-Msg-Id": f"f.{c}.{i}"}
                )
                for i in range(msgs)
            ]
            await asyncio.gather(*futures)
        floor = (time.process_time() - t0) / cycles
        return per_cycle, floor, msgs
    finally:
        await nc.close()


def _fresh(snippet: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    return float(out[0])


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench agent-overhead")
    parser.add_argument("--cycles", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args(argv or [])
    quick = quick or args.quick
    cycles = args.cycles or (40 if quick else 200)
    repeats = 3 if quick else 5

    from shardplane.natsserver import NatsServer

    with NatsServer() as server:
        per_cycle, floor, msgs = asyncio.run(_collector_cpu(server.url, cycles, 0.05))
    cpu_pct = per_cycle / INTERVAL_S * 100.0

    init = statistics.median(_fresh(_INIT_SNIPPET) for _ in range(repeats))
    init_floor = statistics.median(_fresh(_FLOOR_SNIPPET) for _ in range(repeats))
    from shardplane.agents.factory import select_backend

    select_backend("warm")
    t0 = time.perf_counter()
    select_backend("bench")
    warm = time.perf_counter() - t0

    rows = [
        ("collector CPU per cycle (8 devices)", f"{per_cycle * 1000:.3f} ms", f"{cycles} cycles"),
        (
            "  floor: publish+ack 9 msgs",
            f"{floor * 1000:.3f} ms",
            f"ratio {per_cycle / floor:.2f}x",
        ),
        ("% of one core at 2 s interval", f"{cpu_pct:.3f} %", f"target <= {TARGET_CPU_PCT} %"),
        ("backend init, no GPU (fresh process)", f"{init:.3f} s", f"target <= {TARGET_INIT_S} s"),
        ("  floor: fresh import msgspec", f"{init_floor:.3f} s", f"ratio {init / init_floor:.2f}x"),
        ("backend init, no GPU (warm, probe only)", f"{warm * 1000:.2f} ms", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>12}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    print(
        json.dumps(
            {
                "cpu_pct_one_core_8dev_2s": round(cpu_pct, 4),
                "init_s_no_gpu": round(init, 4),
                "cpu_ms_per_cycle_8dev": round(per_cycle * 1000, 4),
                "floor_cpu_ms_per_cycle_publish": round(floor * 1000, 4),
                "init_floor_s": round(init_floor, 4),
                "init_warm_s": round(warm, 5),
                "cycles": cycles,
                "messages_per_cycle": msgs,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main("--quick" in sys.argv))
