"""From a problem to a validated plan: pick the method, solve, audit, and explain failures.

Pure and synchronous (the service runs it in a worker thread so the event loop stays free).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bus.messages import Stage
from planner import validate
from planner.cost import (
    GIB,
    WORKSPACE_BYTES,
    Evaluation,
    Problem,
    StagePlan,
    Tables,
    evaluate,
    lower_bound_ms,
)
from planner.greedy import best_for_order, greedy_plan, node_orders

DEFAULT_TIME_LIMIT_S = 0.5


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
            node=s.device.node, device=s.device.ref, gpu=s.device.gpu,
            layer_start=s.layer_start, layer_end=s.layer_end,
            weight_bytes=ev.weight_bytes[i], kv_bytes=ev.kv_bytes[i],
            bandwidth_gbps=s.device.bandwidth_gbps, stage_ms=ev.stage_ms[i], hop_ms=ev.hop_ms[i],
            memory_bytes=ev.memory[i], free_bytes=max(0, s.device.free_bytes),
            embeddings=s.layer_start == 0, head=s.layer_end == L,
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


def _audit(problem: Problem, plan: tuple[StagePlan, ...], t: Tables) -> tuple[tuple[Stage, ...], Evaluation]:
    ev = evaluate(problem, plan, t)
    stages = to_stages(problem, ev)
    validate.check(problem, stages, ev.bottleneck_ms, ev.latency_ms)
    return stages, ev


def plan(problem: Problem, *, time_limit_s: float | None = None, use_solver: bool = True) -> Outcome:
    """The best plan this planner can prove or find, validated. Raises PlanError."""
    started = time.perf_counter()
    if not problem.devices:
        raise PlanError("no_devices", "no candidate devices (all excluded or none reporting)")
    t = Tables(problem)
    bound = lower_bound_ms(problem)
    if is_homogeneous(problem) and problem.objective == "throughput":
        order = node_orders(problem)[0]
        best = best_for_order(problem, order, t)
        if best is None:
            raise PlanError("insufficient_memory", explain_infeasible(problem))
        stages, ev = _audit(problem, best, t)
        return Outcome(stages, ev, "even-split", "optimal", (time.perf_counter() - started) * 1e3, bound)

    hint = greedy_plan(problem)
    solver_name = "greedy"
    status = "feasible"
    chosen = hint
    if use_solver:
        from planner.solver import solve  # lazy: ortools costs ~0.25 s to import

        limit = time_limit_s or DEFAULT_TIME_LIMIT_S
        result = solve(problem, hint=hint, time_limit_s=limit)
        if result.plan is not None:
            chosen_val = evaluate(problem, result.plan, t).value(problem.objective)
            hint_val = evaluate(problem, hint, t).value(problem.objective) if hint else float("inf")
            # The solver works in integer time units; keep the greedy plan if it is better
            # after exact re-evaluation (never worse than the hint it was given).
            if hint is None or chosen_val <= hint_val * (1 + 1e-9):
                chosen = result.plan
            solver_name = "cp-sat"
            status = result.status
        elif hint is not None:
            solver_name = f"greedy (cp-sat {result.status} within {limit:g} s)"
        elif result.status == "infeasible":
            raise PlanError("insufficient_memory", explain_infeasible(problem))
    if chosen is None:
        raise PlanError("insufficient_memory", explain_infeasible(problem))
    stages, ev = _audit(problem, chosen, t)
    return Outcome(stages, ev, solver_name, status, (time.perf_counter() - started) * 1e3, bound)
