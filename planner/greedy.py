"""Fast plans without a solver: exo's memory-proportional split (the baseline to beat) and the
bottleneck packer (exact for a fixed device order; the CP-SAT hint and fallback).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shardplane.planner.cost import (
    WORKSPACE_BYTES,
    Problem,
    StagePlan,
    Tables,
    evaluate,
    stages_from_counts,
)
from shardplane.planner.fleet import Device


def allocate_layers_proportionally(
    total_layers: int, memory_fractions: Sequence[float]
) -> list[int]:
    """exo's rule (v0.3.x), reproduced faithfully as the baseline.

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


def proportional_plan(problem: Problem) -> tuple[StagePlan, ...]:
    """The memory-proportional baseline over every candidate device in fleet order, by usable
    memory. exo then checks each share against memory with a uniform layer size, ignoring KV,
    embeddings and head; our validator judges it with the real figures instead."""
    devices = list(problem.devices)
    if problem.max_stages is not None and len(devices) > problem.max_stages:
        devices = sorted(devices, key=lambda d: problem.usable(d), reverse=True)[
            : problem.max_stages
        ]
        order = {d.ref: i for i, d in enumerate(problem.devices)}
        devices.sort(key=lambda d: order[d.ref])
    counts = allocate_layers_proportionally(
        problem.layers, [max(0, problem.usable(d)) for d in devices]
    )
    return stages_from_counts(devices, counts)


def _take(
    t: Tables, problem: Problem, dev: Device, nxt: Device | None, a: int, limit_ms: float
) -> int:
    """The largest ``b`` such that device ``dev`` can run layers [a, b) within ``limit_ms``
    (stage plus hop to ``nxt``) and its memory; ``a`` when it cannot take a single layer."""
    L = t.L
    usable = problem.usable(dev)
    bw = dev.bandwidth_gbps * 1e6  # bytes per ms
    # Ending the pipeline here adds the head but drops the hop, so try b == L on its own.
    if t.memory(a, L) <= usable and t.read(a, L) / bw <= limit_ms:
        return L
    hop = t.hop(dev, nxt) if nxt is not None else math.inf
    if t.uniform:  # count layers directly: both limits are linear in the layer count
        room = usable - WORKSPACE_BYTES - (t.embed if a == 0 else 0)
        by_mem = room // t.layer_mem if room >= 0 else 0
        budget = (limit_ms - hop) * bw
        if math.isinf(budget):
            by_time = L
        else:
            by_time = math.floor(budget / t.layer_read + 1e-9) if budget > 0 else 0
        return max(a, min(L - 1, a + by_mem, a + by_time))
    lo, hi = a, L - 1  # largest b in [a+1, L-1] satisfying both; both monotone in b
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if t.memory(a, mid) <= usable and t.read(a, mid) / bw + hop <= limit_ms:
            lo = mid
        else:
            hi = mid - 1
    return lo


def pack(
    problem: Problem, order: Sequence[Device], limit_ms: float, t: Tables
) -> tuple[StagePlan, ...] | None:
    """Walk ``order`` giving each device as many layers as fit under ``limit_ms``; None when the
    layers do not all fit. Exact for a fixed order: maximal prefixes never hurt later devices,
    since a stage's bytes only grow with its range."""
    a = 0
    out: list[StagePlan] = []
    stage_cap = problem.stage_limit
    for i, dev in enumerate(order):
        if a >= t.L or len(out) >= stage_cap:
            break
        nxt = order[i + 1] if i + 1 < len(order) else None
        b = _take(t, problem, dev, nxt, a, limit_ms)
        if b > a:
            out.append(StagePlan(dev, a, b))
            a = b
    return tuple(out) if a >= t.L else None


def best_for_order(
    problem: Problem, order: Sequence[Device], t: Tables | None = None, rel_tol: float = 1e-6
) -> tuple[StagePlan, ...] | None:
    """The minimum-bottleneck plan for a fixed device order (binary search on the bottleneck,
    with :func:`pack` as the feasibility test). Devices may be left unused; a plan only counts
    when its evaluated bottleneck (hops to the devices actually next) is within the limit."""
    t = t or Tables(problem)
    if not order:
        return None
    best = pack(problem, order, math.inf, t)
    if best is None:
        return None
    hi = evaluate(problem, best, t).bottleneck_ms
    lo = t.read(0, t.L) / (sum(d.bandwidth_gbps for d in order) * 1e6)
    for _ in range(80):  # bisection: 80 halvings is far below float resolution
        if hi - lo <= rel_tol * hi:
            break
        mid = (lo + hi) / 2
        plan = pack(problem, order, mid, t)
        value = evaluate(problem, plan, t).bottleneck_ms if plan is not None else math.inf
        if value <= mid * (1 + 1e-12):
            best, hi = plan, value
        else:
            lo = mid
    return best


def node_orders(problem: Problem) -> list[list[Device]]:
    """A few node-contiguous device orders worth trying: a slow-to-fast chain along the cheapest
    links, and nodes by total bandwidth both ways."""
    by_node: dict[str, list[Device]] = {}
    for d in problem.devices:
        by_node.setdefault(d.node, []).append(d)
    for devs in by_node.values():
        devs.sort(key=lambda d: -d.bandwidth_gbps)
    names = list(by_node)
    speed = {n: sum(d.bandwidth_gbps for d in by_node[n]) for n in names}
    fast = sorted(names, key=lambda n: -speed[n])
    # Slow nodes first, each next node the one reached by the cheapest link: slow devices take
    # few layers, the head lands on fast ones, and the pipeline follows the fast links.
    chain = [fast[-1]]
    left = set(names) - {chain[0]}
    while left:
        here = by_node[chain[-1]][0]
        nxt = min(left, key=lambda n: (problem.hop_ms(here, by_node[n][0]), speed[n], n))
        chain.append(nxt)
        left.discard(nxt)
    orders: list[list[Device]] = []
    for seq in (chain, fast, fast[::-1]):
        order = [d for n in seq for d in by_node[n]]
        if order not in orders:
            orders.append(order)
    return orders


def greedy_plan(
    problem: Problem, tables: Tables | None = None, *, good_enough: float = 0.0
) -> tuple[StagePlan, ...] | None:
    """The best feasible plan among the memory-proportional split and the bottleneck packer
    over a few node orders, by the request's objective; None when none fits. Stops early once
    a plan's value is <= ``good_enough`` (a proven lower bound: nothing can beat it)."""
    t = tables or Tables(problem)
    candidates: list[tuple[float, int, tuple[StagePlan, ...]]] = []

    def add(plan: tuple[StagePlan, ...]) -> bool:
        value = evaluate(problem, plan, t).value(problem.objective)
        candidates.append((value, len(plan), plan))
        return value <= good_enough

    prop = proportional_plan(problem)
    if prop and evaluate(problem, prop, t).fits and add(prop):
        return prop
    for order in node_orders(problem):
        plan = best_for_order(problem, order, t)
        if plan is not None and add(plan):
            return plan
        if problem.objective == "latency":  # fewest stages: fill the devices in order
            filled = pack(problem, order, math.inf, t)
            if filled is not None:
                add(filled)
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def any_plan(problem: Problem, tables: Tables | None = None) -> tuple[StagePlan, ...] | None:
    """Some feasible plan, fast (each device in the first workable order takes all it can)."""
    t = tables or Tables(problem)
    for order in node_orders(problem):
        plan = pack(problem, order, math.inf, t)
        if plan is not None and evaluate(problem, plan, t).fits:
            return plan
    return None
