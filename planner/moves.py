"""Minimal moves: when an instance is placed again, keep what is already loaded.

A re-placement (a lost device, a degraded one, a re-sent request) that starts from scratch can
move every stage although one device went away: the optimiser is indifferent between equally
fast plans, and weights are tens of gigabytes a stage. So re-placing is two phases:

1. the best plan's value T* (the solver's plan, or any candidate below that is faster);
2. among plans within ``(1 + slack) x T*``, the one that loads the fewest bytes.

Phase 2 runs over candidate plans built from the previous plan: its layer ranges on its own
devices, each stage whose device is gone put on the free device that serves it best, and then
every single-stage swap onto a free device (which is how one throttled stage moves without the
others); and a search over which surviving stages to keep, most bytes first, completing each
choice with every device order and optimal layer split of the gaps (``search``), bounded by a
time budget. Candidates are scored by the same cost model as the solver's plan (``cost.evaluate``),
so the comparison is like for like. Only the narrow interface ``keep_resident(problem, outcome,
previous stages, slack)`` touches the planner: a solver that can express "bytes kept" in its
own model can replace the candidate search behind it.

A stage's bytes count as kept only when the same device held exactly the same layers (with the
same embeddings/head): that is what a worker adopts without reading anything (``agents
.reconcile.same_weights``); a changed range is reloaded in full.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterator, Sequence

from shardplane.bus.messages import Stage
from shardplane.planner.cost import Evaluation, Problem, StagePlan, Tables, evaluate, max_batch
from shardplane.planner.fleet import Device
from shardplane.planner.plan import Outcome, to_stages

_Key = tuple[str, int, int]
SEARCH_BUDGET_S = 1.0  # the kept-stage search gives up (keeping the other candidates) after this


def _key(device: str, start: int, end: int) -> _Key:
    return (device, start, end)


def bytes_moved(previous: Sequence[Stage], stages: Sequence[Stage]) -> tuple[int, int]:
    """(bytes to load, bytes kept resident) of ``stages`` given what ``previous`` holds."""
    held = {_key(s.device, s.layer_start, s.layer_end) for s in previous}
    moved = kept = 0
    for s in stages:
        if _key(s.device, s.layer_start, s.layer_end) in held:
            kept += s.weight_bytes
        else:
            moved += s.weight_bytes
    return moved, kept


def _moved(ev: Evaluation, held: set[_Key]) -> int:
    return sum(
        w
        for s, w in zip(ev.stages, ev.weight_bytes, strict=True)
        if _key(s.device.ref, s.layer_start, s.layer_end) not in held
    )


def _valid(problem: Problem, ev: Evaluation) -> bool:
    refs = [s.device.ref for s in ev.stages]
    return ev.ok and len(set(refs)) == len(refs)


def _substitute(
    problem: Problem, t: Tables, plan: list[StagePlan | None], ranges: list[tuple[int, int]]
) -> tuple[StagePlan, ...] | None:
    """Fill the gaps (stages whose device is gone) one by one with the free device that gives
    the best plan so far; None when some gap has no device that fits."""
    out = list(plan)
    for i, slot in enumerate(out):
        if slot is not None:
            continue
        used = {s.device.ref for s in out if s is not None}
        best: tuple[float, Device] | None = None
        for d in problem.devices:
            if d.ref in used:
                continue
            trial = [s if s is not None else StagePlan(d, *ranges[j]) for j, s in enumerate(out)]
            # Gaps further on are filled with this device too, only to score this one.
            ev = evaluate(problem, tuple(trial), t)
            if t.memory(*ranges[i]) > problem.usable(d):
                continue
            value = ev.step_ms
            if best is None or value < best[0]:
                best = (value, d)
        if best is None:
            return None
        out[i] = StagePlan(best[1], *ranges[i])
    return tuple(s for s in out if s is not None)


def candidates(problem: Problem, previous: Sequence[Stage]) -> list[Evaluation]:
    """Plans that keep the previous layer ranges: the surviving stages where they are, the
    lost ones on free devices, and each single-stage swap onto a free device."""
    if not previous or previous[-1].layer_end != problem.layers:
        return []  # another model shape (a changed request): nothing carries over
    t = Tables(problem)
    devices = {d.ref: d for d in problem.devices}
    ranges = [(s.layer_start, s.layer_end) for s in previous]
    start: list[StagePlan | None] = [
        StagePlan(devices[s.device], s.layer_start, s.layer_end) if s.device in devices else None
        for s in previous
    ]
    base = _substitute(problem, t, start, ranges)
    if base is None:
        return []
    out = [evaluate(problem, base, t)]
    used = {s.device.ref for s in base}
    for i in range(len(base)):
        for d in problem.devices:
            if d.ref in used:
                continue
            swapped = tuple(StagePlan(d, *ranges[i]) if j == i else s for j, s in enumerate(base))
            out.append(evaluate(problem, swapped, t))
    return [ev for ev in out if _valid(problem, ev)]


def split_range(
    problem: Problem,
    t: Tables,
    order: Sequence[Device],
    a: int,
    b: int,
    after: Device | None,
    limit: float = math.inf,
) -> tuple[float, list[tuple[int, int]]] | None:
    """Layers [a, b) over ``order`` (each device at least one layer), minimising the slowest
    stage with its hop (the last one's hop goes to ``after``); None when nothing fits within
    ``limit``. A stage's time and memory only grow with its end, so each stage's ends are
    scanned only while both stay within bounds."""
    k = len(order)
    if b - a < k:
        return None
    # Fluid bound: the segment's bytes over the order's whole bandwidth.
    if t.read(a, b) / (sum(d.bandwidth_gbps for d in order) * 1e9) * 1e3 > limit:
        return None
    # best[i][x]: (bottleneck, end of stage i) of layers [x, b) over order[i:]
    best: list[dict[int, tuple[float, int]]] = [{} for _ in range(k + 1)]
    best[k][b] = (0.0, b)
    for i in range(k - 1, -1, -1):
        d = order[i]
        nxt = order[i + 1] if i + 1 < k else after
        hop = t.hop(d, nxt) if nxt is not None else 0.0
        usable = problem.usable(d)
        for x in range(a + i, b - (k - i) + 1):
            for y in range(x + 1, b - (k - i - 1) + 1):
                own = t.stage_ms(d, x, y) + hop
                if own > limit or t.memory(x, y) > usable:
                    break
                tail = best[i + 1].get(y)
                if tail is None:
                    continue
                v = max(own, tail[0])
                if x not in best[i] or v < best[i][x][0]:
                    best[i][x] = (v, y)
    if a not in best[0]:
        return None
    ranges: list[tuple[int, int]] = []
    x = a
    for i in range(k):
        y = best[i][x][1]
        ranges.append((x, y))
        x = y
    return best[0][a][0], ranges


class _OutOfTime(Exception):
    pass


def fill(
    problem: Problem,
    t: Tables,
    kept: list[StagePlan],
    segments: list[tuple[int, int]],
    pool: list[Device],
    limit: float,
    deadline: float,
) -> tuple[StagePlan, ...] | None:
    """A plan within ``limit`` that keeps ``kept`` and covers ``segments`` with disjoint
    orders of ``pool`` (every order, every split: exhaustive up to ``deadline``)."""
    if time.monotonic() > deadline:
        raise _OutOfTime
    if not segments:
        plan = tuple(sorted(kept, key=lambda s: s.layer_start))
        ev = evaluate(problem, plan, t)
        return plan if ev.ok and ev.step_ms <= limit else None
    (a, b), rest = segments[0], segments[1:]
    after = next((s.device for s in kept if s.layer_start == b), None)
    room = problem.stage_limit - len(kept) - len(rest)
    for k in range(1, min(len(pool), b - a, room) + 1):
        seen: set[tuple[tuple[str, str, float, int, float], ...]] = set()
        for order in itertools.permutations(pool, k):
            # Orders that differ only by swapping identical devices of one node are one order.
            sig = tuple((d.node, *d.signature(problem.headroom)) for d in order)
            if sig in seen:
                continue
            seen.add(sig)
            got = split_range(problem, t, order, a, b, after, limit)
            if got is None or got[0] > limit:
                continue
            stages = [StagePlan(d, x, y) for d, (x, y) in zip(order, got[1], strict=True)]
            left = [d for d in pool if d not in order]
            found = fill(problem, t, kept + stages, rest, left, limit, deadline)
            if found is not None:
                return found
    return None


EXACT_SUBSETS = 12  # up to this many surviving stages every subset is tried, most bytes first
MAX_DROPPED = 2  # beyond it: subsets that drop at most this many stages, fewest first


def _subsets(alive: list[Stage], t: Tables) -> Iterator[tuple[Stage, ...]]:
    """Which surviving stages to keep, in the order they are tried. Up to ``EXACT_SUBSETS``
    stages: all 2^n subsets by kept bytes, most first (exact). Beyond: generated lazily by how
    many stages are dropped (0, 1, ... ``MAX_DROPPED``), each level by kept bytes, so a
    hundred-stage pipeline never materialises 2^100 subsets."""

    def kept(c: tuple[Stage, ...]) -> int:
        return sum(t.weights(s.layer_start, s.layer_end) for s in c)

    if len(alive) <= EXACT_SUBSETS:
        everything = (c for r in range(len(alive), 0, -1) for c in itertools.combinations(alive, r))
        yield from sorted(everything, key=lambda c: -kept(c))
        return
    for dropped in range(min(MAX_DROPPED, len(alive) - 1) + 1):
        level = itertools.combinations(range(len(alive)), dropped)
        keeps = (tuple(s for i, s in enumerate(alive) if i not in out) for out in level)
        yield from sorted(keeps, key=lambda c: -kept(c))


def search(
    problem: Problem, previous: Sequence[Stage], limit: float, budget_s: float
) -> tuple[StagePlan, ...] | None:
    """The plan within ``limit`` that keeps the most bytes of ``previous``: the subsets of its
    surviving stages, most bytes first, each completed by ``fill``. None when no subset works
    within the time budget (the empty subset is phase 1's business)."""
    deadline = time.monotonic() + budget_s
    t = Tables(problem)
    devices = {d.ref: d for d in problem.devices}
    alive = [s for s in previous if s.device in devices and s.layer_end <= problem.layers]
    try:
        for subset in _subsets(alive, t):
            kept = [StagePlan(devices[s.device], s.layer_start, s.layer_end) for s in subset]
            segments: list[tuple[int, int]] = []
            x = 0
            for s in sorted(kept, key=lambda s: s.layer_start):
                if s.layer_start > x:
                    segments.append((x, s.layer_start))
                x = s.layer_end
            if x < problem.layers:
                segments.append((x, problem.layers))
            used = {s.device.ref for s in kept}
            pool = [d for d in problem.devices if d.ref not in used]
            found = fill(problem, t, kept, segments, pool, limit, deadline)
            if found is not None:
                return found
    except _OutOfTime:
        return None
    return None


def keep_resident(
    problem: Problem,
    outcome: Outcome,
    previous: Sequence[Stage],
    slack: float,
    budget_s: float = SEARCH_BUDGET_S,
) -> Outcome:
    """Phase 2: of the solver's plan, the candidates and the kept-stage search, the one with
    the fewest bytes to load among those within ``(1 + slack)`` of the best value; ties go to
    the faster plan."""
    held = {_key(s.device, s.layer_start, s.layer_end) for s in previous}
    pool = [outcome.evaluation, *candidates(problem, previous)]
    best = min(ev.step_ms for ev in pool)
    limit = best * (1.0 + slack) + 1e-9
    if previous and previous[-1].layer_end == problem.layers:
        found = search(problem, previous, limit, budget_s)
        if found is not None:
            pool.append(evaluate(problem, found))
    chosen = min(
        (ev for ev in pool if ev.step_ms <= limit),
        key=lambda ev: (_moved(ev, held), ev.step_ms),
    )
    if chosen is outcome.evaluation:
        return outcome
    # The bound proven for the best plan still bounds this one; only the distance to it grows.
    bound = outcome.bound_ms if outcome.bound_ms else outcome.lower_bound_ms
    gap = max(0.0, (chosen.step_ms - bound) / chosen.step_ms * 100.0) if bound > 0 else None
    return dataclasses.replace(
        outcome,
        stages=to_stages(problem, chosen),
        evaluation=chosen,
        status=f"{outcome.status}; kept resident stages within {slack:.0%} of the best",
        gap_pct=gap,
        max_batch=max_batch(problem, chosen.stages),
    )
