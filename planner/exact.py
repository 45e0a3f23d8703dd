"""Exhaustive search: the exact optimum for small fleets, to audit the solvers.

Every ordered subset of devices (node-contiguous by default, like the planner's plans, or any
order), and for each order
the exact best split (bottleneck: the packer's bisection, exact for a fixed order; latency: a
dynamic program over layer boundaries). Under the same cost model as everything else. Cost
grows as sum_k D!/(D-k)!, so it is meant for D <= 6 (1,956 orders).
"""

from __future__ import annotations

import math
from itertools import permutations

from shardplane.planner.cost import Problem, StagePlan, Tables, evaluate
from shardplane.planner.fleet import Device
from shardplane.planner.greedy import best_for_order


def _latency_for_order(
    problem: Problem, order: tuple[Device, ...], t: Tables
) -> tuple[StagePlan, ...] | None:
    """Minimum sum(stage + hop) using every device of ``order`` (DP over layer boundaries)."""
    L, k = t.L, len(order)
    inf = math.inf
    # best[i][b]: cheapest cost of devices 0..i-1 covering [0, b); each device >= 1 layer.
    best = [[inf] * (L + 1) for _ in range(k + 1)]
    back = [[-1] * (L + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for i, dev in enumerate(order):
        usable = problem.usable(dev)
        hop = t.hop(dev, order[i + 1]) if i + 1 < k else 0.0
        for a in range(L):
            if best[i][a] == inf:
                continue
            for b in range(a + 1, L + 1):
                if t.memory(a, b) > usable:
                    break
                if (i + 1 < k) == (b == L):
                    continue  # the last device ends at L; others end before it
                cost = best[i][a] + t.stage_ms(dev, a, b) + hop
                if cost < best[i + 1][b]:
                    best[i + 1][b] = cost
                    back[i + 1][b] = a
    if best[k][L] == inf:
        return None
    stages: list[StagePlan] = []
    b = L
    for i in range(k, 0, -1):
        a = back[i][b]
        stages.append(StagePlan(order[i - 1], a, b))
        b = a
    return tuple(reversed(stages))


def _contiguous(order: tuple[Device, ...]) -> bool:
    seen: list[str] = []
    for d in order:
        if not seen or seen[-1] != d.node:
            if d.node in seen:
                return False
            seen.append(d.node)
    return True


def exact_plan(problem: Problem, *, node_contiguous: bool = True) -> tuple[StagePlan, ...] | None:
    """The optimum over all device subsets, orders and splits (None: nothing fits).

    ``node_contiguous`` keeps each node's devices together, the planner's own plan space (one
    crossing of each slow link per node); False searches every order, which can win when two
    slow devices of one node would rather take the embeddings and the head at both ends.
    """
    t = Tables(problem)
    devs = problem.devices
    best: tuple[StagePlan, ...] | None = None
    best_key = (math.inf, math.inf)
    seen: set[tuple[tuple[str, float, int], ...]] = set()
    for k in range(1, problem.stage_limit + 1):
        for order in permutations(devs, k):
            # Orders that differ only by swapping identical devices on one node are the same.
            sig = tuple((d.node, *d.signature(problem.headroom)) for d in order)
            if sig in seen or (node_contiguous and not _contiguous(order)):
                continue
            seen.add(sig)  # pyright: ignore[reportArgumentType]
            if problem.objective == "latency":
                plan = _latency_for_order(problem, order, t)
            else:
                plan = best_for_order(problem, order, t, rel_tol=1e-9)
            if plan is None:
                continue
            ev = evaluate(problem, plan, t)
            if not ev.fits:
                continue
            key = (ev.value(problem.objective), len(plan))
            if key[0] < best_key[0] * (1 - 1e-12) or (
                key[0] <= best_key[0] * (1 + 1e-12) and key[1] < best_key[1]
            ):
                best, best_key = plan, key
    return best
