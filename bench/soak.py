"""soak: the whole control plane live at fleet size, each service in its own process.

Why: the piece benchmarks (projector drain, API latency, placement latency) each pass at 8,000
GPUs, while the system as one process did not keep up. This runs it the way a fleet does: a
private nats-server, the projector, planner and API as ``shardplane`` processes, and the
simulated agents split over several processes (``agent --part I/K``), for ``--minutes``; it
injects faults at random (``sim.fault.<node>``: vanish/return, throttle, fill/drain) and places
instances throughout (``placement.request``, and once 20 are live one ``placement.release``
of a random live one after each placement), and measures:

- lag: sample -> KV, from every KV write of a device key (``$KV.cluster_state.devices.>``): the
  time it was seen minus the sample's own ``ts`` (both clocks are this machine's);
- API: ``GET /api/gpu/devices`` (every device) once a second, p99, by a client process of
  its own (bench._api_poll);
- placement: ``placement.request`` round trips after warm-up, p99 (and ``placement.release``);
- RSS and CPU of every process after warm-up and at the end (growth is judged after warm-up:
  the first minutes fill caches, history rings and the TELEMETRY stream by design;
  ``rss_growth_pct`` is the worst shardplane process, the nats-server's is reported apart);
- correctness: after the agents stop and the projector drains, the KV's sample for every
  device is the last one in TELEMETRY (``lost`` counts those that differ), and the planner's
  ledger holds exactly the instances answered ``ok``, released exactly where a release was.

The floor, measured in the same run: a core-NATS request round trip to this server.
Figures measured while other work loads the machine are pessimistic (lag and p99 are
wall-clock); the table says how loaded it was (1-minute load average).

Run: ``shardplane bench soak [--quick] [-- --nodes 1000 --gpus 8 --minutes 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from shardplane import supervise
from shardplane.bench._floor import echo_round_trips_ms
from shardplane.bus import codec, keys, streams, subjects
from shardplane.bus.messages import DeviceSample, DeviceState
from shardplane.bus.streams import cluster_state, provision
from shardplane.bus.wait import wait_set
from shardplane.natsserver import NatsServer, free_port

log = logging.getLogger(__name__)
TARGETS = {"lag_p99_ms": 250.0, "api_p99_ms": 50.0, "placement_p99_ms": 1000.0}
RSS_GROWTH_TARGET_PCT = 10.0
MODELS = ("llama-3.1-8b", "qwen2.5-7b", "mistral-7b")
LIVE_INSTANCES = 20  # past this many, each placement is followed by a release


@dataclass
class Figures:
    lags_ms: list[float] = field(default_factory=list)
    api_ms: list[float] = field(default_factory=list)
    api_head_ms: list[float] = field(default_factory=list)  # to the response's headers
    api_errors: int = 0
    placement_ms: list[float] = field(default_factory=list)
    placed_ok: set[str] = field(default_factory=set)
    placement_refused: int = 0
    warmup_placement_max_ms: float = 0.0
    refusals: Counter[str] = field(default_factory=Counter[str])  # by error code
    solve_ms: list[float] = field(default_factory=list)  # the planner's own share (reply)
    released_ok: set[str] = field(default_factory=set)
    release_ms: list[float] = field(default_factory=list)
    release_failed: int = 0
    faults: int = 0


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def proc_stat(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds) of ``pid`` from /proc."""
    rss_kib = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = float(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kib / 1024, (int(fields[11]) + int(fields[12])) / ticks


def fleet_toml(nodes: int, gpus: int, interval_s: float) -> str:
    # Mixed GPUs, as a real fleet: the planner has real choices to make.
    kinds = ("A100", "H100", "RTX 4090", "L40S")
    per = nodes // len(kinds)
    groups = [per + (1 if i < nodes % len(kinds) else 0) for i in range(len(kinds))]
    body = f"seed = 11\ninterval_s = {interval_s}\n"
    for kind, count in zip(kinds, groups, strict=True):
        if count:
            name = kind.lower().replace(" ", "")
            body += (
                f'[[nodes]]\nname = "{name}"\ncount = {count}\n'
                f'gpus = [{{ model = "{kind}", count = {gpus} }}]\n'
            )
    return body


def node_names(nodes: int) -> list[str]:
    kinds = ("a100", "h100", "rtx4090", "l40s")
    per = nodes // len(kinds)
    out: list[str] = []
    for i, kind in enumerate(kinds):
        count = per + (1 if i < nodes % len(kinds) else 0)
        if count == 1:
            out.append(kind)
        else:
            width = len(str(count - 1))
            out += [f"{kind}-{j:0{width}d}" for j in range(count)]
    return out


async def watch_lag(nc: Client, figures: Figures, recording: asyncio.Event) -> Any:
    async def on(msg: Msg) -> None:
        if not recording.is_set() or not msg.data:
            return
        try:
            state = codec.decode(DeviceState, msg.data)
        except Exception:
            return
        figures.lags_ms.append((time.time() - state.sample.ts) * 1000)

    return await nc.subscribe(streams.kv_subject(streams.CLUSTER_STATE, f"{keys.DEVICES}.>"), cb=on)


async def poll_api(
    url: str, figures: Figures, stop: asyncio.Event, recording: asyncio.Event
) -> None:
    """Record the answers of the API client process (bench._api_poll: a process of its own, as
    a user's client is, not this one's loop that follows every KV write) while recording."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shardplane.bench._api_poll",
        url + "/api/gpu/devices",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    lines = asyncio.ensure_future(_record_polls(proc.stdout, figures, recording))
    try:
        await stop.wait()
        if proc.returncode is not None or lines.done():
            raise RuntimeError(f"the API client stopped during the soak (exit {proc.returncode})")
    finally:
        proc.stdin.close()  # the client's signal to stop
        try:
            await asyncio.wait_for(proc.wait(), 10.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()  # reaped, not left a zombie
        lines.cancel()


async def _record_polls(
    out: asyncio.StreamReader, figures: Figures, recording: asyncio.Event
) -> None:
    while line := await out.readline():
        if not recording.is_set():
            continue
        match line.split():
            case [b"1", ms, head]:
                figures.api_ms.append(float(ms))
                figures.api_head_ms.append(float(head))
            case _:
                figures.api_errors += 1


async def _request(nc: Client, subject: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """One round trip, its time in ms and the decoded answer (an error naming the exception
    when there was none)."""
    t0 = time.perf_counter()
    try:
        reply = await nc.request(subject, json.dumps(body).encode(), 30.0)
        answer: dict[str, Any] = json.loads(reply.data)
    except Exception as exc:  # no planner yet (start-up), or no answer within 30 s
        answer = {"error": {"code": type(exc).__name__}}
    return (time.perf_counter() - t0) * 1000, answer


async def place_loop(
    nc: Client, figures: Figures, stop: asyncio.Event, every_s: float, recording: asyncio.Event
) -> None:
    """Place an instance every ``every_s``; once ``LIVE_INSTANCES`` are up, release one at random
    after each placement, so the ledger both grows and shrinks all along. Round trips count
    after warm-up only (like lag and API: the first requests import the solver and meet a
    planner still reading the whole fleet); the warm-up's slowest is reported apart."""
    rng = random.Random(3)
    live: list[str] = []
    n = 0
    while not stop.is_set():
        n += 1
        body = {"model": rng.choice(MODELS), "context_tokens": 4096, "instance_id": f"soak-{n}"}
        ms, answer = await _request(nc, subjects.PLACEMENT_REQUEST, body)
        while _not_up_yet(answer) and not recording.is_set() and not stop.is_set():
            await wait_set(stop, 0.5)  # the planner starts beside the soak: ask once it listens
            ms, answer = await _request(nc, subjects.PLACEMENT_REQUEST, body)
        if answer.get("ok"):
            figures.placed_ok.add(str(answer["instance_id"]))
            live.append(str(answer["instance_id"]))
        else:
            figures.placement_refused += 1
            error = answer.get("error") or {"code": "no answer"}
            figures.refusals[str(error.get("code"))] += 1
            log.info("placement %s refused: %s", body["instance_id"], error)
        if recording.is_set():
            figures.placement_ms.append(ms)
            figures.solve_ms.append(float(answer.get("solve_ms") or 0.0))
        else:
            figures.warmup_placement_max_ms = max(figures.warmup_placement_max_ms, ms)
        if len(live) > LIVE_INSTANCES:
            victim = live.pop(rng.randrange(len(live)))
            ms, answer = await _request(nc, subjects.PLACEMENT_RELEASE, {"instance_id": victim})
            if answer.get("ok"):
                figures.released_ok.add(victim)
            else:
                figures.release_failed += 1
            if recording.is_set():
                figures.release_ms.append(ms)
        await wait_set(stop, every_s)


def _not_up_yet(answer: dict[str, Any]) -> bool:
    error: dict[str, Any] = answer.get("error") or {}
    return error.get("code") == "NoRespondersError"


async def fault_loop(
    nc: Client, nodes: list[str], gpus: int, figures: Figures, stop: asyncio.Event
) -> None:
    rng = random.Random(5)
    kinds = ("vanish", "throttle", "fill")
    while not stop.is_set():
        fault = {
            "kind": rng.choice(kinds),
            "device": rng.randrange(gpus),
            "duration_s": rng.uniform(3.0, 15.0),
        }
        with contextlib.suppress(Exception):
            await nc.request(subjects.sim_fault(rng.choice(nodes)), json.dumps(fault).encode(), 5.0)
            figures.faults += 1
        await wait_set(stop, rng.uniform(0.5, 3.0))


async def floor_rtt_ms(nc: Client) -> float:
    return pct(await echo_round_trips_ms(nc, "soak.echo", 200), 0.99)


async def check_kv(nc: Client, nodes: list[str], gpus: int, timeout_s: float) -> int:
    """Devices whose KV sample is not the last sample in TELEMETRY, once the projector had
    ``timeout_s`` to drain."""
    js = nc.jetstream()
    kv = await cluster_state(js)
    devices = [(n, i) for n in nodes for i in range(gpus)]
    deadline = time.monotonic() + timeout_s
    while True:
        wrong = 0
        for node, index in devices:
            try:
                last = await js.get_last_msg(streams.TELEMETRY, subjects.gpu_sample(node, index))
                sample = codec.decode(DeviceSample, last.data or b"")
                entry = await kv.get(keys.device_key(node, index))
                held = codec.decode(DeviceState, entry.value or b"").sample
                same = (held.epoch, held.seq) == (sample.epoch, sample.seq)
            except Exception:
                same = False
            wrong += 0 if same else 1
        if wrong == 0 or time.monotonic() > deadline:
            return wrong
        await asyncio.sleep(2.0)


async def check_ledger(nc: Client, placed_ok: set[str], released_ok: set[str]) -> int:
    """Instances where the ledger and the answers disagree: every instance answered ``ok``
    has an entry, and exactly those whose release was answered ``ok`` are released."""
    from shardplane.planner import ledger

    kv = await nc.jetstream().key_value(streams.LEDGER)
    doc, _ = await ledger.read(kv)
    released = {i for i, e in doc.instances.items() if e.released}
    return len(set(doc.instances) ^ placed_ok) + len(released ^ released_ok)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    nodes = node_names(args.nodes)
    with tempfile.TemporaryDirectory(prefix="shardplane-soak-") as tmp:
        fleet = Path(tmp) / "fleet.toml"
        fleet.write_text(fleet_toml(args.nodes, args.gpus, args.interval))
        async with NatsServer(store_dir=Path(tmp) / "nats") as server:
            nc = await nats.connect(server.url, pending_size=512 * 1024**2)
            await provision(nc.jetstream())
            floor_ms = await floor_rtt_ms(nc)
            api_port = free_port()
            kids = supervise.children(
                fleet=fleet,
                node_count=args.nodes,
                api_host="127.0.0.1",
                api_port=api_port,
                interval_s=args.interval,
                shares=args.agents,
            )
            procs = {k.name: await supervise.spawn(k, server.url) for k in kids}
            assert server.proc is not None
            pids = {"nats-server": server.proc.pid, **{n: p.pid for n, p in procs.items()}}
            figures = Figures()
            stop, recording = asyncio.Event(), asyncio.Event()
            lag_sub = await watch_lag(nc, figures, recording)
            loops = [
                asyncio.create_task(
                    poll_api(f"http://127.0.0.1:{api_port}", figures, stop, recording)
                ),
                asyncio.create_task(place_loop(nc, figures, stop, args.place_every, recording)),
                asyncio.create_task(fault_loop(nc, nodes, args.gpus, figures, stop)),
            ]
            try:
                await asyncio.sleep(args.warmup)
                start = {n: proc_stat(p) for n, p in pids.items()}
                recording.set()
                t0 = time.monotonic()
                while time.monotonic() - t0 < args.minutes * 60:
                    await asyncio.sleep(5.0)
                    dead = [n for n, p in procs.items() if p.returncode is not None]
                    if dead:
                        raise RuntimeError(f"{', '.join(dead)} exited during the soak")
                end = {n: proc_stat(p) for n, p in pids.items()}
                elapsed = time.monotonic() - t0
                recording.clear()
                stop.set()
                await asyncio.gather(*loops)
                await lag_sub.unsubscribe()
                agents = {n: p for n, p in procs.items() if n.startswith("agents")}
                await supervise.stop_all(agents)
                lost = await check_kv(nc, nodes, args.gpus, timeout_s=60.0)
                ledger_mismatch = await check_ledger(nc, figures.placed_ok, figures.released_ok)
            finally:
                stop.set()
                for task in loops:
                    task.cancel()
                await supervise.stop_all(procs)
                await nc.close()
    return report(args, figures, start, end, elapsed, floor_ms, lost, ledger_mismatch)


def report(
    args: argparse.Namespace,
    figures: Figures,
    start: dict[str, tuple[float, float]],
    end: dict[str, tuple[float, float]],
    elapsed: float,
    floor_ms: float,
    lost: int,
    ledger_mismatch: int,
) -> dict[str, Any]:
    print(
        f"soak: {args.nodes} nodes x {args.gpus} GPUs every {args.interval:g} s, "
        f"{elapsed / 60:.1f} min after {args.warmup:.0f} s warm-up; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"{'process':<16}{'RSS start MiB':>14}{'RSS end MiB':>13}{'growth %':>10}{'CPU %':>8}")
    growth: dict[str, float] = {}
    for name in start:
        rss0, cpu0 = start[name]
        rss1, cpu1 = end[name]
        growth[name] = (rss1 - rss0) / rss0 * 100 if rss0 else 0.0
        cpu = (cpu1 - cpu0) / elapsed * 100
        print(f"{name:<16}{rss0:>14.0f}{rss1:>13.0f}{growth[name]:>10.1f}{cpu:>8.0f}")
    lag50, lag99 = pct(figures.lags_ms, 0.5), pct(figures.lags_ms, 0.99)
    api50, api99 = pct(figures.api_ms, 0.5), pct(figures.api_ms, 0.99)
    place99 = pct(figures.placement_ms, 0.99)
    print(
        f"lag sample->KV: p50 {lag50:.0f} ms, p99 {lag99:.0f} ms over {len(figures.lags_ms)} writes"
    )
    head99 = pct(figures.api_head_ms, 0.99)
    print(
        f"API GET /api/gpu/devices: p50 {api50:.1f}, p90 "
        f"{pct(figures.api_ms, 0.9):.1f}, p99 {api99:.1f}, max {max(figures.api_ms, default=math.nan):.1f} ms "
        f"(headers p99 {head99:.1f} ms) over "
        f"{len(figures.api_ms)} ({figures.api_errors} failed); floor: NATS request p99 "
        f"{floor_ms:.2f} ms"
    )
    place50 = statistics.median(figures.placement_ms) if figures.placement_ms else math.nan
    release99 = pct(figures.release_ms, 0.99) if figures.release_ms else None
    print(
        f"placement.request: p99 {place99:.0f} ms, median {place50:.0f} ms over "
        f"{len(figures.placement_ms)} after warm-up (planning itself: p99 "
        f"{pct(figures.solve_ms, 0.99) if figures.solve_ms else math.nan:.0f} ms; warm-up's slowest "
        f"{figures.warmup_placement_max_ms:.0f} ms); {len(figures.placed_ok)} placed, "
        f"{figures.placement_refused} refused {dict(figures.refusals)}"
    )
    print(
        f"placement.release: p99 {release99 or math.nan:.0f} ms over {len(figures.release_ms)}; "
        f"{len(figures.released_ok)} released, {figures.release_failed} failed"
    )
    print(
        f"faults injected: {figures.faults}; KV != last sample: {lost} devices; "
        f"ledger vs answered ok: {ledger_mismatch} differ"
    )
    # The server's memory grows until TELEMETRY holds its 64 samples per device (a store at
    # its limits, not a leak): reported apart from the services' own growth.
    worst = max((g for n, g in growth.items() if n != "nats-server"), default=0.0)
    return {
        "nodes": args.nodes,
        "gpus": args.nodes * args.gpus,
        "minutes": round(elapsed / 60, 2),
        "lag_p50_ms": round(lag50, 1),
        "lag_p99_ms": round(lag99, 1),
        "api_p50_ms": round(api50, 1),
        "api_p99_ms": round(api99, 1),
        "api_headers_p99_ms": round(head99, 1),
        "placement_p99_ms": round(place99, 1),
        "placed": len(figures.placed_ok),
        "released": len(figures.released_ok),
        "release_p99_ms": round(release99, 1) if release99 is not None else None,
        "faults": figures.faults,
        "floor_nats_rtt_p99_ms": round(floor_ms, 3),
        "api_p99_over_floor": round(api99 / floor_ms, 1) if floor_ms else None,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "ledger_mismatch": ledger_mismatch,
        "nats_rss_growth_pct": round(growth.get("nats-server", 0.0), 1),
        "rss_growth_pct": round(worst, 1),
        "lost": lost,
    }


def parse(quick: bool, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardplane bench soak")
    p.add_argument("--nodes", type=int, default=40 if quick else 1000)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--minutes", type=float, default=1.0 if quick else 10.0)
    p.add_argument("--interval", type=float, default=2.0, help="agent sample interval, s")
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before measuring (default: 10 quick, else until TELEMETRY is full: "
        "64 samples per device at --interval, plus 20 s)",
    )
    p.add_argument(
        "--agents", type=int, default=2, help="agent processes sharing the fleet (default 2)"
    )
    p.add_argument("--place-every", type=float, default=5.0, help="seconds between placements")
    args = p.parse_args(argv or [])
    if args.warmup is None:
        args.warmup = 10.0 if quick else 64 * args.interval + 20.0
    if min(args.nodes, args.gpus, args.agents) < 1 or args.minutes <= 0 or args.interval <= 0:
        p.error(
            f"--nodes ({args.nodes}), --gpus ({args.gpus}), --agents ({args.agents}), --minutes "
            f"({args.minutes:g}) and --interval ({args.interval:g}) must all be positive"
        )
    return args


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    args = parse(quick, argv)
    figures = asyncio.run(soak(args))
    print(json.dumps(figures))
    return 0
