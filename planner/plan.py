"""From a problem to a validated plan: pick the method, solve, audit, and explain failures.

Pure and synchronous (the service runs it in a worker thread so the event loop stays free).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shardplane.bus.messages import Stage
from shardplane.planner import validate
from shardplane.planner.bounds import integer_bound_ms
from shardplane.planner.cost import (
    GIB,
    WORKSPACE_BYTES,
    Evaluation,
    Problem,
    StagePlan,
    Tables,
    evaluate,
    lower_bound_ms,
)
from shardplane.planner.greedy import any_plan, best_for_order, greedy_plan, node_orders

PROOF_TOL = 2e-7  # the bounds are bisected to 1e-7; closer than this is equal


class PlanError(Exception):
    """A request that cannot be planned; ``code`` is one of DESIGN.md's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Outcome:
    stages: tuple[Stage, ...]
    evaluation: Evaluation
    solver: str
    status: str
    solve_ms: float
    lower_bound_ms: float
    gap_pct: float | None = None
    bound_ms: float | None = None


def is_homogeneous(problem: Problem) -> bool:
    """Identical devices on a symmetric topology: every device order is equivalent, so the
    packer's single-order optimum is the global optimum and no solver is needed."""
    devs = problem.devices
    if not devs:
        return False
    if len({d.signature(problem.headroom) for d in devs}) != 1:
        return False
    per_node: dict[str, list[int]] = {}
    for i, d in enumerate(devs):
        per_node.setdefault(d.node, []).append(i)
    if len({len(v) for v in per_node.values()}) != 1:
        return False
    fleet = problem.fleet
    intra = {fleet.link(a, b) for a in devs for b in devs if a is not b and a.node == b.node}
    inter = {fleet.link(a, b) for a in devs for b in devs if a.node != b.node}
    return len(intra) <= 1 and len(inter) <= 1


def to_stages(problem: Problem, ev: Evaluation) -> tuple[Stage, ...]:
    L = problem.layers
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
            stage_ms=ev.stage_ms[i],
            hop_ms=ev.hop_ms[i],
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
    return detail


def _audit(
    problem: Problem, plan: tuple[StagePlan, ...], t: Tables
) -> tuple[tuple[Stage, ...], Evaluation]:
    ev = evaluate(problem, plan, t)
    stages = to_stages(problem, ev)
    validate.check(problem, stages, ev.bottleneck_ms, ev.latency_ms)
    return stages, ev


SMALL_FLEET = 8  # up to here CP-SAT gets 60 ms and nearly always proves its plan
CLOSE_ENOUGH = 0.005  # larger fleets: a greedy plan this close to the bound is answered as is
CP_SAT_MAX_DEVICES = 96  # beyond this CP-SAT finds nothing within a useful time; see below


def default_time_limit_s(devices: int) -> float:
    """CP-SAT's default budget (model building included). Small fleets (<= 8 devices) get 60 ms,
    enough to prove nearly every plan; larger ones 10 ms + 1 ms per device, which keeps a
    16-device placement near 50 ms end to end on a small shared machine (the latency target).
    A request's ``time_limit_s`` overrides it."""
    return 0.06 if devices <= SMALL_FLEET else min(2.0, 0.01 + 0.001 * devices)


def plan(
    problem: Problem,
    *,
    time_limit_s: float | None = None,
    use_solver: bool = True,
    method: str = "auto",
) -> Outcome:
    """The best plan this planner can prove or find, validated. Raises PlanError.

    1. Identical devices on a symmetric topology: the packer's plan is optimal (no solver).
    2. Otherwise the greedy plan; when it meets the integer capacity bound it is proven optimal.
    3. Otherwise CP-SAT, hinted with the greedy plan and given the bound; the better of the two
       after exact re-evaluation is kept (never worse than greedy).

    ``method="cp-sat"`` skips the shortcuts of 1 and 2 and always runs the solver (its answer is
    then CP-SAT's own proof); ``"greedy"`` never runs it (same as ``use_solver=False``).
    """
    forced = method == "cp-sat"
    use_solver = use_solver and method != "greedy"
    started = time.perf_counter()
    if not problem.devices:
        raise PlanError("no_devices", "no candidate devices (all excluded or none reporting)")
    t = Tables(problem)
    fluid = lower_bound_ms(problem)

    def done(
        chosen: tuple[StagePlan, ...], solver: str, status: str, bound: float | None
    ) -> Outcome:
        stages, ev = _audit(problem, chosen, t)
        value = ev.value(problem.objective)
        gap = (
            0.0
            if status == "optimal"
            else (max(0.0, (value - bound) / value * 100.0) if bound and value > 0 else None)
        )
        return Outcome(
            stages,
            ev,
            solver,
            status,
            (time.perf_counter() - started) * 1e3,
            fluid,
            gap,
            bound if status != "optimal" else value,
        )

    throughput = problem.objective == "throughput"
    if is_homogeneous(problem) and throughput and not forced:
        best = best_for_order(problem, node_orders(problem)[0], t)
        if best is None:
            raise PlanError("insufficient_memory", explain_infeasible(problem))
        return done(best, "even-split", "optimal", None)

    # The integer bound first (it only needs some feasible plan's value to start from), so the
    # greedy search can stop at the first order whose plan meets it.
    bound = None
    if throughput and (start := any_plan(problem, t)) is not None:
        bound = integer_bound_ms(problem, evaluate(problem, start, t).bottleneck_ms, t)
    good_enough = bound * (1 + PROOF_TOL) if bound and not forced else 0.0
    hint = greedy_plan(problem, t, good_enough=good_enough)
    hint_value = evaluate(problem, hint, t).value(problem.objective) if hint else float("inf")
    proven = bound is not None and hint_value <= bound * (1 + PROOF_TOL)
    if hint is not None and proven and not forced:
        return done(hint, "greedy", "optimal", bound)  # proven: it meets a lower bound
    if not use_solver:
        if hint is None:
            raise PlanError("insufficient_memory", explain_infeasible(problem))
        return done(hint, "greedy", "feasible", bound)

    if (
        time_limit_s is None
        and not forced
        and hint is not None
        and bound
        and len(problem.devices) > SMALL_FLEET
        and hint_value <= bound * (1 + CLOSE_ENOUGH)
    ):
        # Within CLOSE_ENOUGH of a proven bound: a short CP-SAT run on a fleet this size rarely
        # closes such a gap, and its budget would double the request's latency.
        return done(hint, "greedy (within 0.5% of the bound)", "feasible", bound)
    if time_limit_s is None and len(problem.devices) > CP_SAT_MAX_DEVICES and not forced:
        # Measured: at 128-256 devices CP-SAT does not get through presolve in under a second on
        # a small machine, so by default the greedy plan stands, with its proven gap. A request
        # that sets time_limit_s still gets the solver.
        if hint is None:
            raise PlanError("insufficient_memory", explain_infeasible(problem))
        return done(
            hint,
            f"greedy (cp-sat skipped: {len(problem.devices)} devices > {CP_SAT_MAX_DEVICES})",
            "feasible",
            bound,
        )

    from shardplane.planner.solver import solve  # lazy: ortools costs ~0.25 s to import

    limit = time_limit_s or default_time_limit_s(len(problem.devices))
    result = solve(problem, hint=hint, time_limit_s=limit, lower_bound_ms=bound or 0.0)
    if result.plan is not None:
        value = evaluate(problem, result.plan, t).value(problem.objective)
        # The solver works in integer units; keep the hint if exact re-evaluation prefers it.
        chosen = result.plan if hint is None or value <= hint_value * (1 + PROOF_TOL) else hint
        best_bound = max(bound or 0.0, result.bound_ms or 0.0) or None
        return done(chosen, "cp-sat", result.status, best_bound)
    if hint is not None:
        return done(
            hint, f"greedy (cp-sat: {result.status} within {limit:.2f} s)", "feasible", bound
        )
    raise PlanError("insufficient_memory", explain_infeasible(problem))
