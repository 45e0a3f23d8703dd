"""heal: how fast and how frugally a lost device is healed, and that noise moves nothing.

Two parts, both in one run:

1. **Live** (the demo fleet, and a 64-GPU fleet of 16 simulated nodes): an embedded
   nats-server with every service of ``shardplane up`` (the controller included) in this
   process, an instance of a multi-stage model placed and reserved; then one stage's device
   vanishes (``sim.fault.<node>``). ``detect_s``: fault to the controller's ``degraded``
   verdict (its ``ts``); ``heal_s``: fault to every stage of the new generation loaded or
   reserved. Targets: detect <= liveness TTL + one sample interval (a vanish is reported by the
   next sample, no TTL needed); heal <= detect + load time of the moved bytes (0 here: catalog
   models reserve memory, read nothing) + 2 s. The floor is a raw NATS round trip, same run.
   ``flaps``: then, with no fault, the instance is watched for ``--watch-s`` seconds of noisy
   telemetry (the simulator's utilisation noise and workload phases); every controller verdict
   counts (``flap_heals``: the heals among them). The vanish then hits the instance's plan of
   that moment (a flap may have moved it). ``-- --fleet fleet64`` runs one fleet's live part.
2. **Minimal moves, exhaustively** (the demo fleet's devices without noise, three models): for
   every stage of the planner's plan, that device is removed; the planner's re-placement
   (phase 1 + phase 2) moves ``bytes_moved``, and ``bench._heal_reference`` (an exhaustive
   search sharing no code with the planner's solvers) finds ``bytes_minimal``, the fewest bytes
   of any plan within ``(1 + move_slack)`` of the exact optimum T*. Target: ratio <= 1.05.

3. **The 64-GPU fleet's bytes** (noise-free, offline: too many devices for the exhaustive
   search): the middle stage's device lost, phase 2 within the heal's budget (``moves.HEAL``,
   as the live heal plans) against phase 2 unhurried after the same phase 1, and the lost
   stage's own bytes, which any plan loads.

Last line: JSON with ``detect_s``, ``heal_s``, ``flaps``, ``bytes_ratio_max`` per fleet, and
``fleet64_offline_bytes_*``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from shardplane.agents import fleet as simfleet
from shardplane.bench._fleets import demo_hosts, sim_hosts
from shardplane.bench._floor import echo_round_trips_ms
from shardplane.bench._heal_reference import minimal_moves
from shardplane.bus import codec, keys, kvfeed, subjects
from shardplane.bus.messages import InstanceHealth, InstanceState, PlacementReply
from shardplane.bus.streams import CLUSTER_STATE
from shardplane.commands import run_services
from shardplane.natsserver import NatsServer
from shardplane.planner.catalog import resolve
from shardplane.planner.cost import Problem
from shardplane.planner.fleet import Fleet, build_fleet
from shardplane.planner.moves import HEAL, bytes_moved, keep_resident
from shardplane.planner.plan import plan
from shardplane.planner.synthetic import states
from shardplane.wiring import DEMO_FLEET

INTERVAL_S = 0.5  # sample interval of the live runs
TTL_S = 3 * INTERVAL_S

BIG_FLEET = """
seed = 11
interval_s = 0.5
[network]
default_gbps = 25.0
default_latency_ms = 0.05
[[nodes]]
name = "a100"
gpus = [{ model = "A100-80GB", count = 4 }]
nvlink = [[0, 1], [2, 3]]
count = 6
[[nodes]]
name = "l40s"
gpus = [{ model = "L40S", count = 4 }]
count = 5
[[nodes]]
name = "mi"
gpus = [{ model = "MI250X", count = 4 }]
count = 5
"""
BIG_SIM = simfleet.parse(BIG_FLEET, "bench heal's 64-GPU fleet")

MOVES_MODELS = ("llama-3.1-70b-q8", "llama-3.1-70b", "mixtral-8x7b")


# --- minimal moves against the exhaustive reference ------------------------------------------


@dataclass(frozen=True, slots=True)
class MoveRow:
    model: str
    lost: str
    bytes_moved: int  # the planner's re-placement (phase 1 + phase 2)
    bytes_minimal: int  # the exhaustive reference
    phase1_moved: int  # phase 1's plan alone
    step_vs_optimum: float  # the chosen plan's P over the reference's T*
    planner_s: float
    reference_s: float

    @property
    def ratio(self) -> float:
        if self.bytes_minimal:
            return self.bytes_moved / self.bytes_minimal
        return 1.0 if self.bytes_moved == 0 else math.inf


def minimal_moves_table(models: Sequence[str] = MOVES_MODELS, slack: float = 0.05) -> list[MoveRow]:
    """For each model on the demo fleet (noise-free), each device of its plan lost in turn:
    the planner's re-placement (phase 1 + phase 2) against the exhaustive reference."""
    devices, nodes = states(demo_hosts())
    full = build_fleet(devices, nodes)
    rows: list[MoveRow] = []
    for model in models:
        previous = plan(Problem(resolve(model), full, 8192, 1), method="cp-sat").stages
        for lost in previous:
            fleet = Fleet(
                devices=tuple(d for d in full.devices if d.ref != lost.device),
                excluded=(),
                node_links=full.node_links,
            )
            problem = Problem(resolve(model), fleet, 8192, 1)
            started = time.perf_counter()
            phase1 = plan(problem, method="cp-sat")
            chosen = keep_resident(problem, phase1, previous, slack)
            planner_s = time.perf_counter() - started
            started = time.perf_counter()
            ref = minimal_moves(problem, previous, slack)
            assert ref is not None
            rows.append(
                MoveRow(
                    model,
                    lost.device,
                    bytes_moved(previous, chosen.stages)[0],
                    ref.bytes_minimal,
                    bytes_moved(previous, phase1.stages)[0],
                    chosen.evaluation.step_ms / ref.step_ms,
                    planner_s,
                    time.perf_counter() - started,
                )
            )
    return rows


def _print_moves(rows: list[MoveRow]) -> None:
    print("\nminimal moves on the demo fleet (noise-free), each stage's device lost in turn (GB)")
    print(
        f"{'model':<18} {'lost':<9} {'moved':>7} {'minimal':>7} {'ratio':>6} {'phase 1':>7} "
        f"{'P/T*':>6} {'plan s':>6} {'ref s':>6}"
    )
    for r in rows:
        print(
            f"{r.model:<18} {r.lost:<9} {r.bytes_moved / 1e9:>7.2f} {r.bytes_minimal / 1e9:>7.2f} "
            f"{r.ratio:>6.3f} {r.phase1_moved / 1e9:>7.2f} {r.step_vs_optimum:>6.3f} "
            f"{r.planner_s:>6.2f} {r.reference_s:>6.2f}"
        )


# --- the 64-GPU fleet's heal bytes: the live budget against an unhurried phase 2 ----------------

BIG_HOSTS = sim_hosts(BIG_SIM)
BIG_MODEL = "llama-3.1-405b-q4"
UNHURRIED_S = 10.0


@dataclass(frozen=True, slots=True)
class BigHeal:
    lost: str
    moved_budgeted: int  # phase 1 and phase 2 within moves.HEAL, as a live heal plans
    moved_unhurried: int  # the same phase 1, phase 2 given UNHURRIED_S
    lower_bound: int  # the lost stage's own layers: no other stage holds them
    phase2_budget_s: float


def big_heal_bytes(slack: float = 0.05) -> BigHeal:
    """The exhaustive reference cannot search 64 devices, so the 64-GPU heal's bytes are held
    against two things it can: phase 2 with all the time it wants after the same phase 1 (a
    budget too tight to keep anything shows here: the live heal once reloaded all 228.3 GB
    where 132.1 GB could stay), and the lost stage's own bytes, which any plan must load."""
    devices, nodes = states(BIG_HOSTS)
    full = build_fleet(devices, nodes)
    model = resolve(BIG_MODEL)
    previous = plan(Problem(model, full, 8192, 1), method="cp-sat", time_limit_s=10).stages
    lost = previous[len(previous) // 2]
    fleet = Fleet(
        devices=tuple(d for d in full.devices if d.ref != lost.device),
        excluded=(),
        node_links=full.node_links,
    )
    problem = Problem(model, fleet, 8192, 1)
    started = time.perf_counter()
    phase1 = plan(problem, method="cp-sat", time_limit_s=HEAL.phase1_limit(10))
    budget = HEAL.phase2(time.perf_counter() - started)
    budgeted = keep_resident(problem, phase1, previous, slack, budget)
    unhurried = keep_resident(problem, phase1, previous, slack, UNHURRIED_S)
    return BigHeal(
        str(lost.device),
        bytes_moved(previous, budgeted.stages)[0],
        bytes_moved(previous, unhurried.stages)[0],
        lost.weight_bytes,
        budget,
    )


# --- live ----------------------------------------------------------------------------------------


async def _instance(nc: Client, instance_id: str) -> InstanceState | None:
    kv = await nc.jetstream().key_value(CLUSTER_STATE)
    try:
        entry = await kv.get(keys.instance_key(instance_id))
    except Exception:
        return None
    return codec.decode(InstanceState, entry.value) if entry.value else None


def _ready(s: InstanceState | None, generation: int) -> bool:
    return (
        s is not None
        and s.generation >= generation
        and len(s.stages) == s.stage_count
        and all(st.state in ("loaded", "reserved") for st in s.stages)
    )


async def _until(nc: Client, instance_id: str, generation: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ready(await _instance(nc, instance_id), generation):
            return time.time()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{instance_id} generation {generation} not ready in {timeout:.0f} s")


async def _rtt_floor(nc: Client) -> float:
    return statistics.median(await echo_round_trips_ms(nc, "bench.heal.echo", 50))


async def live(fleet: Path, model: str, devices: int, watch_s: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(store_dir=Path(store))
        await asyncio.to_thread(server.start)
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:
            tasks = await run_services(
                server.url, stop, fleet=fleet, api=False, interval_s=INTERVAL_S, ttl_s=TTL_S
            )
            nc = await nats.connect(server.url)
            try:
                return await _scenario(nc, model, devices, watch_s)
            finally:
                await nc.close()
        finally:
            stop.set()
            if tasks:
                await asyncio.wait(tasks, timeout=20)
            await asyncio.to_thread(server.stop)


async def _wait_devices(nc: Client, count: int) -> None:
    js = nc.jetstream()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            found = [
                k for k in await kvfeed.snapshot(js, CLUSTER_STATE) if keys.kind_of(k) == "device"
            ]
        except Exception:
            found = []
        if len(found) >= count:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"fewer than {count} devices reported")


async def _scenario(nc: Client, model: str, devices: int, watch_s: float) -> dict[str, object]:
    await _wait_devices(nc, devices)
    floor_ms = await _rtt_floor(nc)
    verdicts: list[InstanceHealth] = []

    async def on_health(msg: Msg) -> None:
        verdicts.append(codec.decode(InstanceHealth, msg.data))

    await nc.subscribe(f"{subjects.PLACEMENT_HEALTH}.>", cb=on_health)
    body = json.dumps({"model": model, "instance_id": "bench-heal", "time_limit_s": 10}).encode()
    reply = PlacementReply(ok=False)
    for _attempt in range(50):  # the planner may still be starting
        try:
            msg = await nc.request(subjects.PLACEMENT_REQUEST, body, timeout=60)
        except Exception:
            await asyncio.sleep(0.2)
            continue
        reply = codec.decode(PlacementReply, msg.data, "json")
        break
    if not reply.ok:
        raise RuntimeError(f"placement failed: {reply.error}")
    await _until(nc, "bench-heal", reply.generation, 60)
    # Noise only first: every decision while nothing is wrong is a flap.
    await asyncio.sleep(watch_s)
    flaps = len(verdicts)
    flap_heals = sum(v.state == "healing" for v in verdicts)
    # A flap may have moved the instance: the fault hits its current plan.
    now = await _instance(nc, "bench-heal")
    assert now is not None
    await _until(nc, "bench-heal", now.generation, 120)
    lost = now.stages[len(now.stages) // 2]
    assert lost.device is not None
    node, index = lost.device.split("/")
    fault_at = time.time()
    await nc.request(
        subjects.sim_fault(node),
        json.dumps({"kind": "vanish", "device": int(index)}).encode(),
        timeout=10,
    )
    healed_at = await _until(nc, "bench-heal", now.generation + 1, 120)
    degraded = [v for v in verdicts[flaps:] if v.state == "degraded" and v.ts >= fault_at]
    detect_s = (degraded[0].ts - fault_at) if degraded else math.nan
    state = await _instance(nc, "bench-heal")
    assert state is not None
    healing = [v for v in verdicts if v.state == "healing"]
    moved_text = healing[-1].reason if healing else ""
    return {
        "devices": devices,
        "stages": len(reply.stages),
        "lost": lost.device,
        "detect_s": round(detect_s, 3),
        "heal_s": round(healed_at - fault_at, 3),
        "detect_target_s": TTL_S + INTERVAL_S,
        "heal_target_s": round(detect_s + 2.0, 3),
        "flaps": flaps,
        "flap_heals": flap_heals,
        "watch_s": watch_s,
        "rtt_floor_ms": round(floor_ms, 3),
        "moved": moved_text,
    }


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench heal")
    parser.add_argument("--watch-s", type=float, default=None, help="noise-only watch per fleet")
    parser.add_argument(
        "--fleet",
        choices=("demo", "fleet64"),
        action="append",
        help="run only this fleet's live part (repeatable; default: both)",
    )
    args = parser.parse_args(argv or [])
    watch_s = args.watch_s if args.watch_s is not None else (20.0 if quick else 600.0)
    chosen: list[str] = args.fleet or ["demo", "fleet64"]
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.toml"
        big.write_text(BIG_FLEET)
        live_runs = {
            "demo": (DEMO_FLEET, "llama-3.1-70b-q8", simfleet.load(DEMO_FLEET).device_count()),
            "fleet64": (big, BIG_MODEL, BIG_SIM.device_count()),
        }
        runs = {name: asyncio.run(live(*live_runs[name], watch_s)) for name in chosen}
    print("live: vanish one stage's device (seconds; floor = raw NATS round trip)")
    print(
        f"{'fleet':<8} {'stages':>6} {'detect':>7} {'target':>7} {'heal':>7} {'target':>7} {'flaps':>5} {'floor ms':>8}"
    )
    for name, r in runs.items():
        print(
            f"{name:<8} {r['stages']:>6} {r['detect_s']:>7} {r['detect_target_s']:>7} "
            f"{r['heal_s']:>7} {r['heal_target_s']:>7} {r['flaps']:>5} {r['rtt_floor_ms']:>8}"
        )
        print(f"         {r['moved']}")
    rows = minimal_moves_table(MOVES_MODELS[:2] if quick else MOVES_MODELS)
    _print_moves(rows)
    big = big_heal_bytes()
    print(
        f"\n64-GPU fleet (noise-free), {BIG_MODEL}, {big.lost} lost: phase 2 within the heal's "
        f"budget ({big.phase2_budget_s:.2f} s) loads {big.moved_budgeted / 1e9:.1f} GB, "
        f"unhurried ({UNHURRIED_S:.0f} s) {big.moved_unhurried / 1e9:.1f} GB; the lost stage "
        f"alone holds {big.lower_bound / 1e9:.1f} GB"
    )
    figures = {
        f"{name}_{key}": r[key]
        for name, r in runs.items()
        for key in ("detect_s", "heal_s", "flaps", "flap_heals", "rtt_floor_ms")
    }
    figures["watch_s"] = watch_s
    figures["bytes_ratio_max"] = max(r.ratio for r in rows)
    figures["bytes_moved_total"] = sum(r.bytes_moved for r in rows)
    figures["bytes_minimal_total"] = sum(r.bytes_minimal for r in rows)
    figures["fleet64_offline_bytes_moved"] = big.moved_budgeted
    figures["fleet64_offline_bytes_unhurried"] = big.moved_unhurried
    figures["fleet64_offline_bytes_lost_stage"] = big.lower_bound
    print(json.dumps(figures))
    return 0
