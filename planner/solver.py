"""CP-SAT placement (stub until the model lands)."""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost import Problem, StagePlan


@dataclass(frozen=True, slots=True)
class SolveResult:
    plan: tuple[StagePlan, ...] | None
    status: str
    gap_pct: float | None = None


def solve(problem: Problem, *, hint: tuple[StagePlan, ...] | None, time_limit_s: float) -> SolveResult:
    del problem, hint, time_limit_s
    return SolveResult(None, "unknown")
