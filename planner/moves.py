"""Minimal moves: when an instance is placed again, keep what is already loaded.

A re-placement (a lost device, a degraded one, a re-sent request) that starts from scratch can
move every stage although one device went away: the optimiser is indifferent between equally
fast plans, and weights are tens of gigabytes a stage. So re-placing is two phases:

1. the best plan's step time T* (``planner.plan``: greedy or CP-SAT);
2. among plans with ``P <= (1 + slack) x T*``, the one that loads the fewest bytes, then the
   fastest: CP-SAT's placement model itself with the residency of the old plan added
   (``solver.solve_moves``), bounded by phase 1's plan's P in the model's own arithmetic and
   hinted with the old plan (or phase 1's), at phase 1's M and every other M whose lower bound
   can be within the limit.

Every plan is re-scored in floating point (``cost.evaluate``) and must be within the limit
there too; phase 1's plan is always a candidate, so phase 2 never answers worse than it.
``candidates`` (the old layer ranges with each lost stage on the best free device, and every
single-stage swap) is the fallback where CP-SAT is not run (fleets beyond
``plan.CP_SAT_MAX_DEVICES``) or does not prove its answer within its budget: cheap, and it
covers the common heal (one stage's device gone) even then.

A stage's bytes count as kept only when the same device held exactly the same layers (with the
same embeddings/head): that is what a worker adopts without reading anything (``agents
.reconcile.same_weights``); a changed range is reloaded in full.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from shardplane.bus.messages import Stage
from shardplane.planner.bounds import step_bound_ms
from shardplane.planner.cost import Evaluation, Problem, StagePlan, Tables, evaluate, max_batch
from shardplane.planner.fleet import Device
from shardplane.planner.plan import CP_SAT_MAX_DEVICES, Outcome, to_stages

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


MOVES_BUDGET_S = 1.0  # phase 2's CP-SAT budget over every M (a heal is rare, its load is long)


@dataclasses.dataclass(frozen=True, slots=True)
class HealBudget:
    """How long a heal may plan, one rule: phase 1 at most ``phase1_s``, phase 2 its usual
    ``phase2_s`` less whatever phase 1 ran over its cap (never under ``min_phase2_s``), so a
    heal plans within ``total_s`` (1.6 s) unless phase 1 overran by more than phase 2 can give.

    Why a cap at all: the instance cannot serve while its heal plans, and the bench's target
    gives a heal 2 s beyond its detection (plus the load). The stored request's own
    time_limit_s was for a first placement: measured (bench heal, 64 GPUs, one stage's device
    vanished, traced), phase 1 with the request's 10 s proved its plan in 0.2-0.6 s but took
    3.0-3.2 s (1.6 s of CPU) in 2 of 5 runs on the loaded 2-core machine, and phase 2 then ran
    its full budget without a proof in half the runs: heals of 4.1-4.6 s against targets of
    2.8-2.9 s. CP-SAT's time limit is wall time, so the cap holds on a busy machine; a capped
    phase 1 answers its best plan found (never worse than greedy's), and a better one is the
    controller's soft path's to find, with its hysteresis.

    Why phase 2 keeps its full budget after a phase 1 within its cap: cut to what was left of
    a 1 s budget for both, it kept nothing on the 64-GPU fleet (228.3 GB reloaded where
    132.1 GB could stay resident), and seconds of reloading cost more than the planning they
    save."""

    phase1_s: float = 0.6
    phase2_s: float = MOVES_BUDGET_S
    min_phase2_s: float = 0.1  # a phase 1 that took everything still leaves phase 2 a try

    @property
    def total_s(self) -> float:
        return self.phase1_s + self.phase2_s

    def phase1_limit(self, time_limit_s: float | None) -> float | None:
        """Phase 1's limit: the request's own, at most ``phase1_s`` (None: the planner's
        default, 10 ms + 1 ms a device, already below it up to 590 devices)."""
        return None if time_limit_s is None else min(time_limit_s, self.phase1_s)

    def phase2(self, phase1_took_s: float) -> float:
        """Phase 2's budget after a phase 1 that took ``phase1_took_s`` (a clock that stepped
        back counts as no time)."""
        overrun = max(0.0, phase1_took_s - self.phase1_s)
        return max(self.min_phase2_s, self.phase2_s - overrun)


HEAL = HealBudget()


def _phase2(
    problem: Problem,
    t: Tables,
    best: Evaluation,
    previous: Sequence[Stage],
    slack: float,
    budget_s: float,
) -> tuple[list[Evaluation], bool]:
    """CP-SAT's fewest-bytes plan at phase 1's M, then at every other M whose bound can be
    within the limit, each with an equal share of the time left; (plans, all proven)."""
    from shardplane.planner.solver import solve_moves  # lazy: ortools costs ~0.25 s to import

    held = {_key(s.device, s.layer_start, s.layer_end) for s in previous}
    limit_ms = best.step_ms * (1.0 + slack)
    bounds = {m: step_bound_ms(problem, m, t) for m in problem.all_m_choices()}
    others = sorted((m for m in bounds if m != best.microbatches), key=lambda m: bounds[m])
    todo = [best.microbatches, *(m for m in others if bounds[m] <= limit_ms)]
    devices = {d.ref: d for d in problem.devices}
    old: tuple[StagePlan, ...] | None = None
    if all(s.device in devices for s in previous):
        old = tuple(StagePlan(devices[s.device], s.layer_start, s.layer_end) for s in previous)
        then = evaluate(problem, old, t)
        if not then.ok or then.step_ms > limit_ms:
            old = None  # no longer a plan within the limit: phase 1's plan is the better start
    deadline = time.perf_counter() + budget_s
    limit_units: int | None = None
    found: list[Evaluation] = []
    proven = True
    for i, m in enumerate(todo):
        left = deadline - time.perf_counter()
        res = solve_moves(
            problem,
            m,
            previous,
            limit_units=limit_units,
            anchor=best.stages,
            slack=slack,
            hint=old,
            time_limit_s=max(0.01, left / (len(todo) - i)),
            lower_bound_ms=bounds.get(m, 0.0),
            tables=t,
        )
        limit_units = res.limit_units
        if limit_units is None:  # the model cannot express phase 1's plan: no bound to share
            return found, False
        proven = proven and res.status in ("optimal", "infeasible")
        if res.plan is not None:
            found.append(evaluate(problem, res.plan, t))
            if _moved(found[-1], held) == 0:
                break  # nothing loads: no M can do better
    return found, proven


def keep_resident(
    problem: Problem,
    outcome: Outcome,
    previous: Sequence[Stage],
    slack: float,
    budget_s: float = MOVES_BUDGET_S,
) -> Outcome:
    """Phase 2: the plan loading the fewest bytes among phase 1's, CP-SAT's phase 2 and (when
    that is not run or not proven) the candidates, of those within ``(1 + slack)`` of phase 1's
    step time; ties go to the faster plan."""
    if not previous or previous[-1].layer_end != problem.layers:
        return outcome  # another model shape (a changed request): nothing carries over
    t = Tables(problem)
    held = {_key(s.device, s.layer_start, s.layer_end) for s in previous}
    best = outcome.evaluation
    pool = [best]
    proven = False
    if len(problem.devices) <= CP_SAT_MAX_DEVICES:
        found, proven = _phase2(problem, t, best, previous, slack, budget_s)
        pool += found
    if not proven:
        pool += candidates(problem, previous)
    limit = best.step_ms * (1.0 + slack) * (1.0 + 1e-9)
    chosen = min(
        (ev for ev in pool if _valid(problem, ev) and ev.step_ms <= limit),
        key=lambda ev: (_moved(ev, held), ev.step_ms),
    )
    if chosen is best:
        return outcome
    # The bound proven for the best plan still bounds this one; only the distance to it grows.
    bound = outcome.bound_ms if outcome.bound_ms else outcome.lower_bound_ms
    gap = max(0.0, (chosen.step_ms - bound) / chosen.step_ms * 100.0) if bound > 0 else None
    how = "proven" if proven else "best found"
    return dataclasses.replace(
        outcome,
        stages=to_stages(problem, chosen),
        evaluation=chosen,
        status=f"{outcome.status}; fewest bytes to load within {slack:.0%} of the best ({how})",
        gap_pct=gap,
        max_batch=max_batch(problem, chosen.stages),
    )
