"""From a problem to a validated plan: pick the method, solve, audit, and explain failures.

Pure and synchronous (the service runs it in a worker thread so the event loop stays free).
Every method minimises the step time P(M) of planner.schedule over devices, order, layer
ranges and M; fewer stages, then fewer nodes break ties.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from shardplane.bus.errors import PlannerError
from shardplane.bus.messages import ErrorCode, SolverMethod, Stage
from shardplane.planner import validate
from shardplane.planner.bounds import step_bound_ms
from shardplane.planner.cost import (
    GIB,
    WORKSPACE_BYTES,
    Evaluation,
    Problem,
    Tables,
    evaluate,
    lower_bound_ms,
    max_batch,
    schedule_of,
)
from shardplane.planner.greedy import greedy_evaluation
from shardplane.planner.prune import prune

PROOF_TOL = 2e-7  # the bounds are bisected to 1e-7; closer than this is equal


class PlanError(PlannerError):
    """A request that cannot be planned; ``code`` is one of the reply's error codes
    (``bus.messages.ErrorCode``, the list the contract in ../shared/DESIGN.md publishes)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Outcome:
    stages: tuple[Stage, ...]
    evaluation: Evaluation  # at the chosen M
    solver: str
    status: str
    solve_ms: float
    lower_bound_ms: float
    gap_pct: float | None = None
    bound_ms: float | None = None
    max_batch: int = 0


def to_stages(problem: Problem, ev: Evaluation, tables: Tables | None = None) -> tuple[Stage, ...]:
    """The reply's stages: t_s(B) and h_s(B), the whole batch as one micro-batch (the last
    stage's hop is the return hop), so a client can recompute the M = 1 step time by a sum."""
    L = problem.layers
    whole = schedule_of(problem, ev.stages, 1, tables)
    return tuple(
        Stage(
            node=s.device.node,
            device=s.device.ref,
            gpu=s.device.gpu,
            layer_start=s.layer_start,
            layer_end=s.layer_end,
            weight_bytes=ev.weight_bytes[i],
            kv_bytes=ev.kv_bytes[i],
            bandwidth_gbps=s.device.bandwidth_gbps,
            stage_ms=whole.stage_ms[i],
            hop_ms=whole.hop_ms[i],
            memory_bytes=ev.memory[i],
            free_bytes=max(0, s.device.free_bytes),
            embeddings=s.layer_start == 0,
            head=s.layer_end == L,
            calibrated=s.device.calibrated,
        )
        for i, s in enumerate(ev.stages)
    )


def explain_infeasible(problem: Problem) -> str:
    """Why no plan fits, with the numbers: what the model needs, what each device offers."""
    t = Tables(problem)
    p = problem.profile
    need = t.memory(0, problem.layers)
    weights = p.weight_bytes / GIB
    kv = (t.K[-1]) / GIB
    devs = sorted(problem.devices, key=lambda d: -problem.usable(d))
    usable = sum(max(0, problem.usable(d)) for d in devs)
    listing = ", ".join(f"{d.ref} {max(0, problem.usable(d)) / GIB:.1f}" for d in devs[:8])
    more = f" and {len(devs) - 8} more" if len(devs) > 8 else ""
    one_layer = t.memory(0, 1) - t.embed
    detail = (
        f"{p.name} needs at least {need / GIB:.1f} GiB (weights {weights:.1f} GiB, KV cache "
        f"{kv:.1f} GiB for {problem.context_tokens} tokens x batch {problem.batch}, plus "
        f"{WORKSPACE_BYTES / GIB:.1f} GiB workspace per stage); the {len(devs)} candidate devices "
        f"have {usable / GIB:.1f} GiB usable after {problem.headroom:.0%} headroom and earlier "
        f"promises ({listing}{more} GiB)"
    )
    if devs and problem.usable(devs[0]) < one_layer:
        detail += f"; even one layer needs {one_layer / GIB:.2f} GiB"
    if problem.max_stages is not None:
        detail += f"; max_stages={problem.max_stages}"
    if problem.stage_floor > 1:
        detail += f"; at least {problem.stage_floor} stages (min_stages/microbatches)"
    return detail


def check_request(problem: Problem) -> None:
    """Requests no plan can satisfy whatever the memory: say which numbers conflict."""
    m = problem.microbatches
    if isinstance(m, int) and problem.objective != "latency" and m > problem.batch:
        raise PlanError(
            "invalid_request",
            f"microbatches={m} exceeds batch={problem.batch}: a micro-batch holds at least "
            "one sequence",
        )
    if problem.stage_floor > problem.stage_limit:
        raise PlanError(
            "invalid_request",
            f"the plan needs at least {problem.stage_floor} stages (min_stages="
            f"{problem.min_stages}, microbatches={m!r}) but at most {problem.stage_limit} are "
            f"possible ({len(problem.devices)} candidate devices, {problem.layers} layers, "
            f"max_stages={problem.max_stages})",
        )


SMALL_FLEET = 8  # up to here CP-SAT gets 60 ms and nearly always proves its plan
CLOSE_ENOUGH = 0.005  # larger fleets: a greedy plan this close to the bound is answered as is
CP_SAT_MAX_DEVICES = 96  # beyond this CP-SAT finds nothing within a useful time; see below


def default_time_limit_s(devices: int) -> float:
    """CP-SAT's default budget (model building included), over every M it must try. Small
    fleets (<= 8 devices) get 60 ms, enough to prove nearly every plan; larger ones 10 ms + 1 ms
    per device, which keeps a 16-device placement near 50 ms end to end on a small shared
    machine (the latency target). A request's ``time_limit_s`` overrides it."""
    return 0.06 if devices <= SMALL_FLEET else min(2.0, 0.01 + 0.001 * devices)


@dataclass
class _Run:
    """Bookkeeping of one plan() call: the clock, the tables and how to finish."""

    problem: Problem
    tables: Tables
    started: float
    fluid: float
    solving: Problem  # what CP-SAT sees: ``problem`` less the nodes pruning dropped

    def done(self, ev: Evaluation, solver: str, status: str, bound: float | None) -> Outcome:
        stages = to_stages(self.problem, ev, self.tables)
        validate.check(
            self.problem,
            stages,
            ev.bottleneck_ms,
            ev.latency_ms,
            microbatches=ev.microbatches,
            step_ms=ev.step_ms,
        )
        value = ev.step_ms
        finite = bound is not None and math.isfinite(bound) and bound > 0
        gap = (
            0.0
            if status == "optimal"
            else (max(0.0, (value - bound) / value * 100.0) if finite and bound else None)
        )
        return Outcome(
            stages,
            ev,
            solver,
            status,
            (time.perf_counter() - self.started) * 1e3,
            self.fluid,
            gap,
            value if status == "optimal" else (bound if finite else None),
            max_batch(self.problem, ev.stages, self.tables),
        )


def plan(
    problem: Problem,
    *,
    time_limit_s: float | None = None,
    use_solver: bool = True,
    method: SolverMethod = "auto",
) -> Outcome:
    """The best plan this planner can prove or find, validated. Raises PlanError.

    1. The greedy plan (planner.greedy); when it meets the lower bound (planner.bounds) it is
       proven optimal and answered at once.
    2. Otherwise CP-SAT, one model per M whose bound can still beat the best plan so far,
       hinted with greedy's plan for that M; the better plan after exact re-evaluation is kept
       (never worse than greedy).

    ``method="cp-sat"`` skips the shortcut of 1 and runs the solver for every M (its answer is
    then CP-SAT's own proof); ``"greedy"`` never runs it (same as ``use_solver=False``).
    """
    forced = method == "cp-sat"
    use_solver = use_solver and method != "greedy"
    started = time.perf_counter()
    if not problem.devices:
        raise PlanError("no_devices", "no candidate devices (all excluded or none reporting)")
    check_request(problem)
    t = Tables(problem)
    run = _Run(problem, t, started, lower_bound_ms(problem, t), problem)
    # One lower bound per M (planner.bounds); the request's is the smallest.
    bounds = {m: step_bound_ms(problem, m, t) for m in problem.all_m_choices()}
    bound = min(bounds.values(), default=math.inf)
    if not math.isfinite(bound):
        raise PlanError("insufficient_memory", explain_infeasible(problem))
    per_m: dict[int, Evaluation] = {}
    good_enough = bound * (1 + PROOF_TOL) if not forced else 0.0
    hint = greedy_evaluation(problem, t, good_enough=good_enough, per_m=per_m)
    if hint is not None and hint.step_ms <= bound * (1 + PROOF_TOL) and not forced:
        return run.done(hint, "greedy", "optimal", bound)  # proven: it meets a lower bound
    if not use_solver:
        if hint is None:
            raise PlanError("insufficient_memory", explain_infeasible(problem))
        return run.done(hint, "greedy", "feasible", bound)
    default = time_limit_s is None and not forced
    close = hint is not None and hint.step_ms <= bound * (1 + CLOSE_ENOUGH)
    if default and close and hint is not None and len(problem.devices) > SMALL_FLEET:
        # Within CLOSE_ENOUGH of a proven bound: a short CP-SAT run rarely closes such a gap
        # on a fleet this size, and its budget would double the request's latency.
        return run.done(hint, "greedy (within 0.5% of the bound)", "feasible", bound)
    if hint is not None:
        # Nodes no plan as good as the greedy one needs (planner.prune): the optimum, and so
        # every bound and proof, is the same over the nodes that are left.
        used = {s.device.node for ev in per_m.values() for s in ev.stages}
        run.solving = prune(problem, hint.step_ms, t, keep=used).problem
    devices = len(run.solving.devices)
    if default and hint is not None and devices > CP_SAT_MAX_DEVICES:
        # Measured: at 128-256 devices CP-SAT does not get through presolve in under a second
        # on a small machine, so by default the greedy plan stands, with its proven gap. A
        # request that sets time_limit_s still gets the solver.
        return run.done(
            hint,
            f"greedy (cp-sat skipped: {devices} devices > {CP_SAT_MAX_DEVICES} after pruning)",
            "feasible",
            bound,
        )
    limit = time_limit_s or default_time_limit_s(devices)
    return _with_solver(run, hint, per_m, bounds, limit, forced)


@dataclass
class _Search:
    """What CP-SAT over the M values found and proved."""

    best: Evaluation | None
    proven: dict[int, float] = field(default_factory=dict[int, float])  # M -> bound on P
    all_optimal: bool = True
    ran: int = 0
    failure: str = ""


def _solve_each_m(
    run: _Run,
    search: _Search,
    per_m: dict[int, Evaluation],
    bounds: dict[int, float],
    deadline: float,
    forced: bool,
) -> None:
    """CP-SAT for every M that can still beat the incumbent, cheapest bound first, each with
    an equal share of the time left."""
    from shardplane.planner.solver import solve  # lazy: ortools costs ~0.25 s to import

    problem, t = run.problem, run.tables
    todo = sorted(bounds, key=lambda m: bounds[m])
    for i, m in enumerate(todo):
        incumbent = search.best.step_ms if search.best is not None else math.inf
        if not forced and bounds[m] >= incumbent * (1 - PROOF_TOL):
            search.proven[m] = bounds[m]  # nothing at this M beats the incumbent
            continue
        left = deadline - time.perf_counter()
        seed = per_m.get(m)
        res = solve(
            run.solving,
            m,
            hint=seed.stages if seed is not None else None,
            time_limit_s=max(0.01, left / (len(todo) - i)) if left > 0 else 0.01,
            lower_bound_ms=bounds[m],
            tables=t,
        )
        search.ran += 1
        if res.status == "infeasible":
            search.proven[m] = math.inf
            continue
        search.proven[m] = max(bounds[m], res.bound_ms or 0.0)
        if res.plan is None:
            search.all_optimal = False
            search.failure = res.status
            continue
        ev = evaluate(problem, res.plan, t, microbatches=m)
        if ev.ok and (search.best is None or ev.key < search.best.key):
            search.best = ev
        search.all_optimal = search.all_optimal and res.status == "optimal"


def _with_solver(
    run: _Run,
    hint: Evaluation | None,
    per_m: dict[int, Evaluation],
    bounds: dict[int, float],
    limit: float,
    forced: bool,
) -> Outcome:
    """CP-SAT's answer, or the greedy plan with CP-SAT's proof, labelled honestly."""
    search = _Search(hint)
    _solve_each_m(run, search, per_m, bounds, run.started + limit, forced)
    best = search.best
    if best is None:
        raise PlanError("insufficient_memory", explain_infeasible(run.problem))
    bound = min(search.proven.values(), default=math.inf)
    optimal = search.all_optimal and best.step_ms <= bound * (1 + 1e-4)  # integer rounding
    if search.ran == 0:  # every M's bound met the greedy plan: it is optimal
        status = "optimal" if best.step_ms <= bound * (1 + PROOF_TOL) else "feasible"
        return run.done(best, "greedy", status, bound)
    if search.failure and best is hint:
        label = f"greedy (cp-sat: {search.failure} within {limit:.2f} s)"
        return run.done(best, label, "feasible", bound)
    return run.done(best, "cp-sat", "optimal" if optimal else "feasible", bound)
