"""Fast plans without a solver: the CP-SAT hint and fallback, and the baselines the benchmark
compares against.

The packer gives each device of a fixed order as many layers as fit under a cap T on its stage
time t_s(b) and in its memory. The step time P(M) = max(round trip, M x busiest stage) trades
the two: a low cap balances the stages (the M x busiest term) but draws in slower devices and
more hops (the round trip). So for each order and each M the cap is bisected towards the point
where the two terms meet, every plan met on the way is scored exactly, and the best is kept.
Single devices and exo's plan are candidates too, so the hint is never worse than either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shardplane.planner.cost import (
    WORKSPACE_BYTES,
    Evaluation,
    Problem,
    StagePlan,
    Tables,
    evaluate,
    fluid_bound_ms,
    stages_from_counts,
)
from shardplane.planner.fleet import Device, Fleet

BISECTION_STEPS = 28


def allocate_layers_proportionally(
    total_layers: int, memory_fractions: Sequence[float]
) -> list[int]:
    """exo's rule (v0.3.x), reproduced faithfully.

    Each node gets ``floor(fraction x total_layers)`` layers; the leftover layers go one each
    to the largest fractional parts (largest remainder); a node left with 0 layers takes 1 from
    the node with the most. Every layer is assumed to be the same size.
    """
    n = len(memory_fractions)
    if n == 0:
        return []
    total = sum(memory_fractions)
    fractions = [f / total for f in memory_fractions] if total > 0 else [1.0 / n] * n
    raw = [f * total_layers for f in fractions]
    counts = [math.floor(r) for r in raw]
    leftover = total_layers - sum(counts)
    by_remainder = sorted(range(n), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in by_remainder[:leftover]:
        counts[i] += 1
    for i in range(n):
        if counts[i] == 0 and total_layers >= n:
            donor = max(range(n), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] += 1
    return counts


def exo_plan(problem: Problem) -> tuple[StagePlan, ...]:
    """exo's placement (REFERENCE.md), reproduced faithfully: one device per host (here the
    host's device with the most usable memory; exo's spill to system RAM is left out), the
    smallest set of hosts whose memory holds the model's weights (ties: the most memory, i.e.
    the hosts with the most), layers split by memory with largest remainder in fleet order.
    exo checks only the weights against memory; our validator judges the plan with the KV
    cache, the embeddings and the head."""
    best: dict[str, Device] = {}
    for d in problem.devices:
        if d.node not in best or problem.usable(d) > problem.usable(best[d.node]):
            best[d.node] = d
    need = problem.profile.weight_bytes
    chosen: set[str] = set()
    held = 0
    for node in sorted(best, key=lambda n: -problem.usable(best[n])):
        if held >= need:
            break
        chosen.add(node)
        held += max(0, problem.usable(best[node]))
    if held < need:
        return ()
    devices = [d for d in problem.devices if d.node in chosen and best[d.node] is d]
    if problem.max_stages is not None and len(devices) > problem.max_stages:
        return ()
    counts = allocate_layers_proportionally(
        problem.layers, [max(0, problem.usable(d)) for d in devices]
    )
    return stages_from_counts(devices, counts)


def single_device_plans(problem: Problem, t: Tables) -> list[tuple[StagePlan, ...]]:
    """Every device that holds the whole model alone."""
    if problem.stage_floor > 1:
        return []
    whole = t.memory(0, t.L)
    return [(StagePlan(d, 0, t.L),) for d in problem.devices if whole <= problem.usable(d)]


def fastest_single_devices(problem: Problem, t: Tables) -> list[tuple[StagePlan, ...]]:
    """Of :func:`single_device_plans`, the one that can win (the first of the fastest). Alone
    on a device a plan runs at M = 1 with no hop, so its step time is its stage time at the
    whole batch; scoring every one of 8,000 devices was most of a fleet-size request."""
    if problem.m_choices(1) != (1,):
        return single_device_plans(problem, t)
    whole = t.memory(0, t.L)
    best: tuple[float, Device] | None = None
    for d in problem.devices:
        if whole <= problem.usable(d):
            ms = t.stage_ms(d, 0, t.L)
            if best is None or ms < best[0]:
                best = (ms, d)
    return [(StagePlan(best[1], 0, t.L),)] if best is not None else []


def _take(t: Tables, problem: Problem, dev: Device, a: int, limit_ms: float) -> int:
    """The largest ``e`` such that ``dev`` runs layers [a, e) within ``limit_ms`` and its memory;
    ``a`` when it cannot take a single layer."""
    L = t.L
    usable = problem.usable(dev)
    # Ending the pipeline here adds the head, so try e == L on its own.
    if t.memory(a, L) <= usable and t.stage_ms(dev, a, L) <= limit_ms:
        return L
    if t.uniform:  # count layers directly: both limits are linear in the layer count
        room = usable - WORKSPACE_BYTES - (t.embed if a == 0 else 0)
        by_mem = room // t.layer_mem if room >= 0 else 0
        by_time = L if math.isinf(limit_ms) else math.floor(limit_ms / t.per_layer_ms(dev) + 1e-9)
        return max(a, min(L - 1, a + by_mem, a + by_time))
    lo, hi = a, L - 1  # largest e in [a+1, L-1] satisfying both; both monotone in e
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if t.memory(a, mid) <= usable and t.stage_ms(dev, a, mid) <= limit_ms:
            lo = mid
        else:
            hi = mid - 1
    return lo


def pack(
    problem: Problem, order: Sequence[Device], limit_ms: float, t: Tables
) -> tuple[StagePlan, ...] | None:
    """Walk ``order`` giving each device as many layers as fit under ``limit_ms``; None when the
    layers do not all fit. Maximal prefixes never hurt later devices (a stage's bytes only grow
    with its range), so this finds a plan with every t_s <= limit whenever the order has one."""
    a = 0
    out: list[StagePlan] = []
    stage_cap = problem.stage_limit
    for dev in order:
        if a >= t.L or len(out) >= stage_cap:
            break
        e = _take(t, problem, dev, a, limit_ms)
        if e > a:
            out.append(StagePlan(dev, a, e))
            a = e
    return tuple(out) if a >= t.L else None


def best_for_order(
    problem: Problem, order: Sequence[Device], m: int, t: Tables
) -> Evaluation | None:
    """A good plan for a fixed device order at M = ``m``: bisect the stage-time cap towards
    where the round trip and m x the busiest stage meet, keeping the best plan scored."""
    tm = t.for_m(m)
    filled = pack(problem, order, math.inf, tm)
    if filled is None:
        return None
    best: Evaluation | None = None

    def score(plan: tuple[StagePlan, ...]) -> Evaluation:
        nonlocal best
        ev = evaluate(problem, plan, t, microbatches=m)
        if ev.ok and (best is None or ev.key < best.key):
            best = ev
        return ev

    first = score(filled)
    hi = first.bottleneck_ms
    lo = tm.read(0, tm.L) / (sum(d.bandwidth_gbps for d in order) * 1e6)
    for _ in range(BISECTION_STEPS):
        if hi - lo <= 1e-6 * hi:
            break
        mid = (lo + hi) / 2
        plan = pack(problem, order, mid, tm)
        if plan is None:
            lo = mid
            continue
        ev = score(plan)
        few = len(plan) < max(m, problem.stage_floor)
        if few or m * ev.bottleneck_ms >= ev.latency_ms:
            hi = mid  # the busiest stage dominates (or too few stages): balance more
        else:
            lo = mid  # the round trip dominates: fewer, faster stages
    return best


def fastest_fill(
    problem: Problem, order: Sequence[Device], t: Tables
) -> tuple[StagePlan, ...] | None:
    """For a fixed order, the layers on the devices fastest per layer first, each up to its
    memory (the first also holding the embeddings, the last the head), the slow ones taking
    what is left: the smallest sum of stage times for that order, what a single micro-batch's
    round trip wants. Uniform layers only (each layer costs the same everywhere)."""
    if not t.uniform or not order:
        return None
    k = len(order)
    caps: list[int] = []
    for i, d in enumerate(order):
        room = problem.usable(d) - WORKSPACE_BYTES
        room -= (t.embed if i == 0 else 0) + (t.head if i == k - 1 else 0)
        caps.append(max(0, room // t.layer_mem))
    counts = [0] * k
    left = t.L
    for i in sorted(range(k), key=lambda i: t.per_layer_ms(order[i])):
        counts[i] = min(caps[i], left)
        left -= counts[i]
    if left > 0:
        return None
    return stages_from_counts(tuple(order), counts)


def node_orders(problem: Problem) -> list[list[Device]]:
    """A few node-contiguous device orders worth trying: nodes by their fastest device (the
    round trip is shortest on the fastest devices), a slow-to-fast chain along the cheapest
    links, and nodes by total bandwidth both ways."""
    by_node: dict[str, list[Device]] = {}
    for d in problem.devices:
        by_node.setdefault(d.node, []).append(d)
    for devs in by_node.values():
        devs.sort(key=lambda d: -d.bandwidth_gbps)
    names = list(by_node)
    speed = {n: sum(d.bandwidth_gbps for d in by_node[n]) for n in names}
    fast = sorted(names, key=lambda n: -speed[n])
    fastest = sorted(names, key=lambda n: (-by_node[n][0].bandwidth_gbps, -speed[n]))
    chain = _chain(problem.fleet, names, fast[-1], speed)
    orders: list[list[Device]] = []
    for seq in (fastest, chain, fast, fast[::-1]):
        order = [d for n in seq for d in by_node[n]]
        if order not in orders:
            orders.append(order)
    return orders


def greedy_evaluation(
    problem: Problem,
    tables: Tables | None = None,
    *,
    good_enough: float = 0.0,
    per_m: dict[int, Evaluation] | None = None,
) -> Evaluation | None:
    """The best valid plan among single devices, exo's plan and the packer over a few orders
    and every M the request allows, by (step time, stages, nodes); None when none fits. Stops
    early once a plan's step time is <= ``good_enough`` (a proven lower bound). ``per_m``, when
    given, receives the best plan found at each M (the solver's hints)."""
    t = tables or Tables(problem)
    best: Evaluation | None = None
    seen = per_m if per_m is not None else {}

    def offer(ev: Evaluation | None) -> bool:
        nonlocal best
        if ev is not None and ev.ok:
            known = seen.get(ev.microbatches)
            if known is None or ev.key < known.key:
                seen[ev.microbatches] = ev
            if best is None or ev.key < best.key:
                best = ev
        return best is not None and best.step_ms <= good_enough

    for plan in fastest_single_devices(problem, t):
        offer(evaluate(problem, plan, t))
    exo = exo_plan(problem)
    if exo and offer(evaluate(problem, exo, t)):
        return best
    if best is not None and best.step_ms <= good_enough:
        return best
    orders = node_orders(problem)
    for order in orders:
        if (filled := fastest_fill(problem, order, t)) and offer(evaluate(problem, filled, t)):
            return best
    for m in problem.all_m_choices():
        if best is not None and fluid_bound_ms(problem, m, t) >= best.step_ms:
            continue  # no plan at this M can beat the incumbent
        for order in orders:
            if offer(best_for_order(problem, order, m, t)):
                return best
    return best


def greedy_plan(
    problem: Problem, tables: Tables | None = None, *, good_enough: float = 0.0
) -> tuple[StagePlan, ...] | None:
    ev = greedy_evaluation(problem, tables, good_enough=good_enough)
    return ev.stages if ev is not None else None


def min_bottleneck_plan(
    problem: Problem, tables: Tables | None = None
) -> tuple[StagePlan, ...] | None:
    """The planner's old objective, kept as a baseline: the smallest max(t_s(B) + h_s(B)) over
    the packer's orders (every batch in flight at once, the round trip ignored)."""
    t = tables or Tables(problem)
    best: tuple[float, tuple[StagePlan, ...]] | None = None
    for order in node_orders(problem):
        hi_plan = pack(problem, order, math.inf, t)
        if hi_plan is None:
            continue
        lo, hi = 0.0, _old_bottleneck(t, hi_plan)
        plan = hi_plan
        for _ in range(60):
            if hi - lo <= 1e-7 * hi:
                break
            mid = (lo + hi) / 2
            cand = _pack_with_hops(problem, order, mid, t)
            if cand is not None and _old_bottleneck(t, cand) <= mid * (1 + 1e-12):
                plan, hi = cand, _old_bottleneck(t, cand)
            else:
                lo = mid
        if best is None or hi < best[0]:
            best = (hi, plan)
    return best[1] if best else None


def _old_bottleneck(t: Tables, plan: tuple[StagePlan, ...]) -> float:
    return max(
        t.stage_ms(s.device, s.layer_start, s.layer_end)
        + (t.hop(s.device, plan[i + 1].device) if i + 1 < len(plan) else 0.0)
        for i, s in enumerate(plan)
    )


def _pack_with_hops(
    problem: Problem, order: Sequence[Device], limit_ms: float, t: Tables
) -> tuple[StagePlan, ...] | None:
    a = 0
    out: list[StagePlan] = []
    for i, dev in enumerate(order):
        if a >= t.L or len(out) >= problem.stage_limit:
            break
        nxt = order[i + 1] if i + 1 < len(order) else None
        hop = t.hop(dev, nxt) if nxt is not None else math.inf
        e = _take(t, problem, dev, a, limit_ms)
        if e < t.L:
            e = _take(t, problem, dev, a, limit_ms - hop) if math.isfinite(hop) else a
            e = min(e, t.L - 1)
        if e > a:
            out.append(StagePlan(dev, a, e))
            a = e
    return tuple(out) if a >= t.L else None


def any_plan(problem: Problem, tables: Tables | None = None) -> tuple[StagePlan, ...] | None:
    """Some valid plan, fast (each device in the first workable order takes all it can)."""
    t = tables or Tables(problem)
    for order in node_orders(problem):
        plan = pack(problem, order, math.inf, t)
        if plan is not None and evaluate(problem, plan, t).ok:
            return plan
    return None


def _chain(fleet: Fleet, names: list[str], start: str, speed: dict[str, float]) -> list[str]:
    """Every node once from ``start``, each time to the node of lowest link latency from the
    last (then the slowest, then by name). Only a node's own links differ from the default,
    so the rest are taken in (speed, name) order from one sorted list instead of comparing
    every pair of nodes (a 1,000-node fleet made that a million link look-ups)."""
    peers: dict[str, dict[str, float]] = {}
    for (a, b), link in fleet.node_links.items():  # Fleet.link: (a, b) before (b, a)
        peers.setdefault(a, {})[b] = link.latency_ms
        peers.setdefault(b, {}).setdefault(a, link.latency_ms)
    default = fleet.default_link.latency_ms
    ranked = sorted(names, key=lambda n: (speed[n], n))
    left = set(names) - {start}
    chain, front = [start], 0
    while left:
        near = peers.get(chain[-1], {})
        while ranked[front] not in left:
            front += 1
        j = front
        while j < len(ranked) and (ranked[j] not in left or ranked[j] in near):
            j += 1
        options = [(lat, speed[n], n) for n, lat in near.items() if n in left]
        if j < len(ranked):
            options.append((default, speed[ranked[j]], ranked[j]))
        nxt = min(options)[2]
        chain.append(nxt)
        left.discard(nxt)
    return chain
