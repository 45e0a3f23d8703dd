"""Minimal moves: when an instance is placed again, keep what is already loaded.

A re-placement (a lost device, a degraded one, a re-sent request) that starts from scratch can
move every stage although one device went away: the optimiser is indifferent between equally
fast plans, and weights are tens of gigabytes a stage. So re-placing is two phases:

1. the best plan's value T* (the solver's plan, or any candidate below that is faster);
2. among plans within ``(1 + slack) x T*``, the one that loads the fewest bytes.

Phase 2 runs over candidate plans built from the previous plan: its layer ranges on its own
devices, each stage whose device is gone put on the free device that serves it best, and then
every single-stage swap onto a free device (which is how one throttled stage moves without the
others). Candidates are scored by the same cost model as the solver's plan (``cost.evaluate``),
so the comparison is like for like. Only the narrow interface ``keep_resident(problem, outcome,
previous stages, slack)`` touches the planner: a solver that can express "bytes kept" in its
own model can replace the candidate search behind it.

A stage's bytes count as kept only when the same device held exactly the same layers (with the
same embeddings/head): that is what a worker adopts without reading anything (``agents
.reconcile.same_weights``); a changed range is reloaded in full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from shardplane.bus.messages import Stage
from shardplane.planner.cost import Evaluation, Problem, StagePlan, Tables, evaluate
from shardplane.planner.fleet import Device
from shardplane.planner.plan import Outcome, to_stages

_Key = tuple[str, int, int]


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
    return ev.fits and len(set(refs)) == len(refs)


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
            value = ev.value(problem.objective)
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


def keep_resident(
    problem: Problem, outcome: Outcome, previous: Sequence[Stage], slack: float
) -> Outcome:
    """Phase 2: of the solver's plan and the candidates, the one with the fewest bytes to load
    among those within ``(1 + slack)`` of the best value; ties go to the faster plan."""
    held = {_key(s.device, s.layer_start, s.layer_end) for s in previous}
    pool = [outcome.evaluation, *candidates(problem, previous)]
    objective = problem.objective
    best = min(ev.value(objective) for ev in pool)
    limit = best * (1.0 + slack) + 1e-9
    chosen = min(
        (ev for ev in pool if ev.value(objective) <= limit),
        key=lambda ev: (_moved(ev, held), ev.value(objective)),
    )
    if chosen is outcome.evaluation:
        return outcome
    return dataclasses.replace(
        outcome,
        stages=to_stages(problem, chosen),
        evaluation=chosen,
        status=f"{outcome.status}; kept resident stages within {slack:.0%} of the best",
    )
