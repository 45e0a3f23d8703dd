"""Minimal moves (phase 2 in the CP-SAT model, checked against the bench's exhaustive reference)
and the controller's hysteresis, pure."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from shardplane.bench._heal_reference import minimal_moves
from shardplane.bus.messages import Stage
from shardplane.planner import health
from shardplane.planner.cost import GIB, Problem, StagePlan, Tables, evaluate
from shardplane.planner.fleet import Device, Fleet
from shardplane.planner.moves import HEAL, MOVES_BUDGET_S, bytes_moved, candidates, keep_resident
from shardplane.planner.plan import Outcome, plan, to_stages
from tests import kit
from tests.planner.test_solvers import _dev, _tiny  # pyright: ignore[reportPrivateUsage]


def _outcome(problem: Problem, stages: tuple[StagePlan, ...]) -> Outcome:
    ev = evaluate(problem, stages)
    return Outcome(
        stages=to_stages(problem, ev),
        evaluation=ev,
        solver="test",
        status="optimal",
        solve_ms=0.0,
        lower_bound_ms=0.0,
    )


def _b_lost() -> tuple[Problem, tuple[Stage, ...], Outcome]:
    """Two stages on a and b of four equal devices; b is lost, and the solver's new plan
    (equally fast) happens to move both stages, to c and d. Returns the problem after the loss,
    the plan before it and phase 1's plan."""
    a, b, c, d = (_dev(f"{n}/0", 1000.0, 8) for n in "abcd")
    before = Problem(_tiny(), Fleet(devices=(a, b)), 1000, 1, headroom=0.0)
    previous = _outcome(before, (StagePlan(a, 0, 2), StagePlan(b, 2, 4))).stages
    after = Problem(_tiny(), Fleet(devices=(a, c, d)), 1000, 1, headroom=0.0)
    return after, previous, _outcome(after, (StagePlan(c, 0, 2), StagePlan(d, 2, 4)))


def test_a_lost_stage_moves_alone_when_an_equal_plan_keeps_the_rest() -> None:
    after, previous, phase1 = _b_lost()
    assert bytes_moved(previous, phase1.stages)[1] == 0
    chosen = keep_resident(after, phase1, previous, 0.05)
    moved, kept = bytes_moved(previous, chosen.stages)
    assert chosen.stages[0].device == "a/0" and (chosen.stages[0].layer_end == 2)
    assert kept == previous[0].weight_bytes and moved == chosen.stages[1].weight_bytes
    assert chosen.evaluation.bottleneck_ms <= phase1.evaluation.bottleneck_ms * 1.05


def test_phase2_gets_what_phase1_left_of_the_heal_budget() -> None:
    # A heal's instance is down while the planner works: phase 2 must not add its full budget
    # to a phase 1 that already took most of the heal's planning time.
    assert HEAL.phase2(0.0) == min(MOVES_BUDGET_S, HEAL.total_s)
    assert HEAL.phase2(HEAL.total_s * 0.4) == pytest.approx(HEAL.total_s * 0.6)
    assert HEAL.phase2(HEAL.total_s * 3) == HEAL.min_phase2_s  # a slow phase 1: still a try
    assert HEAL.phase2(-1.0) <= MOVES_BUDGET_S  # a clock step back gives no extra time
    assert HEAL.min_phase2_s <= HEAL.phase2(0.5) <= HEAL.total_s


def test_a_heal_plans_within_one_budget_whatever_its_request_allowed() -> None:
    # The stored request's time_limit_s (10 s in bench heal) was for its first placement; a
    # heal of it may not spend that while the instance is down.
    assert HEAL.phase1_limit(10.0) == HEAL.phase1_s
    assert HEAL.phase1_limit(0.05) == 0.05  # a tighter request stays as tight
    assert HEAL.phase1_limit(None) is None  # the planner's default is below the cap already
    worst = HEAL.phase1_s + HEAL.phase2(HEAL.phase1_s)
    assert worst <= max(HEAL.total_s, HEAL.phase1_s + HEAL.min_phase2_s)


def test_the_smallest_phase2_budget_still_keeps_the_survivors() -> None:
    after, previous, phase1 = _b_lost()
    chosen = keep_resident(after, phase1, previous, 0.05, budget_s=HEAL.min_phase2_s)
    moved, kept = bytes_moved(previous, chosen.stages)
    assert kept == previous[0].weight_bytes and moved == previous[1].weight_bytes


def test_keeping_stages_never_costs_more_than_the_slack() -> None:
    a, b, c = _dev("a/0", 1000.0, 8), _dev("b/0", 1000.0, 8), _dev("c/0", 500.0, 8)
    d = _dev("d/0", 4000.0, 16)
    before = Problem(_tiny(), Fleet(devices=(a, b)), 1000, 1, headroom=0.0)
    previous = _outcome(before, (StagePlan(a, 0, 2), StagePlan(b, 2, 4))).stages
    after = Problem(_tiny(), Fleet(devices=(a, c, d)), 1000, 1, headroom=0.0)
    phase1 = _outcome(after, (StagePlan(d, 0, 4),))  # one fast device: far better
    chosen = keep_resident(after, phase1, previous, 0.05)
    assert chosen is phase1  # a:[0,2) + c:[2,4) would be twice as slow
    # With a slack wide enough to cover that, the resident stage stays.
    lax = keep_resident(after, phase1, previous, 5.0)
    assert lax.stages[0].device == "a/0"


def test_noisy_telemetry_never_crosses_the_margin() -> None:
    """Bandwidth readings with +-10 % noise around the planned figure, 10 minutes of checks at
    1 s: smoothed, the plan never reads as degraded, so no move is ever even priced."""
    cfg = health.HealConfig()
    rng = random.Random(3)
    previous = _outcome(
        Problem(_tiny(), Fleet(devices=(_dev("a/0", 1000.0, 8),)), 1000, 1, headroom=0.0),
        (StagePlan(_dev("a/0", 1000.0, 8), 0, 4),),
    ).stages
    planned = health.planned_value(previous, "throughput")
    smoother = health.Smoother(cfg.smoothing)
    streak = health.Streak()
    flaps = 0
    for _ in range(600):
        bw = smoother.update({"a/0": 1000.0 * rng.uniform(0.9, 1.1)})
        current = health.value(previous, "throughput", bw)
        reason = "degraded" if health.degraded(current, planned, cfg) else None
        if streak.hold(reason) >= cfg.hold_checks:
            flaps += 1
    assert flaps == 0
    # A real throttle (half the bandwidth) reads as degraded within a few checks.
    bw = smoother.update({"a/0": 500.0})
    for _ in range(4):
        bw = smoother.update({"a/0": 500.0})
    assert health.degraded(health.value(previous, "throughput", bw), planned, cfg)


def test_a_move_must_beat_the_margin_and_pay_back_its_load() -> None:
    cfg = health.HealConfig(margin=0.15, payback_s=600.0, load_gbps=2.0)
    assert not health.worth_moving(10.0, 9.0, 0, cfg)  # 10 %: inside the margin
    assert health.worth_moving(10.0, 7.0, 10 * 10**9, cfg)  # 30 % for 5 s of loading
    # 30 % over 10 minutes is 180 s of gain; 400 GB at 2 GB/s is 200 s of loading.
    assert not health.worth_moving(10.0, 7.0, 400 * 10**9, cfg)


def _fits(ref: str, bw: float, need: int) -> Device:
    return replace(_dev(ref, bw, 1), total_bytes=need, free_bytes=need)


def test_the_model_splits_a_lost_range_that_no_free_device_holds() -> None:
    """b is lost and no free device holds its two layers: the old ranges cannot be kept with a
    substitute (``candidates`` has nothing), but the model keeps a's range and splits b's over
    c and d, which is the fewest bytes the exhaustive reference finds too."""
    prof = _tiny(4)
    t = Tables(Problem(prof, Fleet(devices=(_dev("x/0", 1.0, 80),)), 1000, 1, headroom=0.0))
    a = _fits("a/0", 1000.0, t.memory(0, 2))
    b = _fits("b/0", 1000.0, t.memory(2, 4))
    c, d = _fits("c/0", 1000.0, t.memory(3, 4)), _fits("d/0", 1000.0, t.memory(3, 4))
    before = Problem(prof, Fleet(devices=(a, b)), 1000, 1, headroom=0.0)
    previous = _outcome(before, (StagePlan(a, 0, 2), StagePlan(b, 2, 4))).stages
    after = Problem(prof, Fleet(devices=(a, c, d)), 1000, 1, headroom=0.0)
    # An equally fast phase 1 plan that moves a's range too (so loads everything).
    phase1 = _outcome(after, (StagePlan(c, 0, 1), StagePlan(a, 1, 3), StagePlan(d, 3, 4)))
    assert bytes_moved(previous, phase1.stages)[1] == 0
    assert candidates(after, previous) == []
    chosen = keep_resident(after, phase1, previous, 0.05)
    moved, kept = bytes_moved(previous, chosen.stages)
    assert kept == t.weights(0, 2) and moved == t.weights(2, 4)
    assert chosen.evaluation.step_ms <= phase1.evaluation.step_ms * 1.05
    ref = minimal_moves(after, previous, 0.05)
    assert ref is not None and ref.bytes_minimal == moved


def test_an_old_plan_that_is_still_optimal_moves_nothing() -> None:
    """Two identical devices: phase 1 may answer the twin, equally fast; the instance stays."""
    a, b = _dev("a/0", 1000.0, 8), _dev("b/0", 1000.0, 8)
    problem = Problem(_tiny(), Fleet(devices=(a, b)), 1000, 1, headroom=0.0)
    previous = _outcome(problem, (StagePlan(a, 0, 4),)).stages
    twin = _outcome(problem, (StagePlan(b, 0, 4),))
    chosen = keep_resident(problem, twin, previous, 0.0)
    assert bytes_moved(previous, chosen.stages) == (0, previous[0].weight_bytes)
    assert chosen.evaluation.step_ms == twin.evaluation.step_ms


def _random_case(seed: int) -> tuple[Problem, tuple[Stage, ...]]:
    """A small random fleet (memory-bound: two to four stages), its optimal plan, then the
    fleet with one of that plan's devices lost or throttled."""
    rng = random.Random(seed)
    prof = _tiny(6)
    devs = tuple(
        _dev(
            f"n{i // 2}/{i % 2}", rng.choice((300.0, 600.0, 1000.0, 2000.0)), rng.choice((3, 4, 6))
        )
        for i in range(rng.randint(4, 5))
    )
    batch = rng.choice((1, 4))
    before = Problem(prof, Fleet(devices=devs), 1000, batch, headroom=0.0)
    previous = plan(before, method="cp-sat", time_limit_s=5.0).stages
    hit = rng.choice(previous).device
    if rng.random() < 0.5:
        left = tuple(d for d in devs if d.ref != hit)
    else:
        left = tuple(
            replace(d, bandwidth_gbps=d.bandwidth_gbps / 3) if d.ref == hit else d for d in devs
        )
    return Problem(prof, Fleet(devices=left), 1000, batch, headroom=0.0), previous


@pytest.mark.parametrize("seed", range(6))
def test_fewest_bytes_match_the_exhaustive_reference(seed: int) -> None:
    """Against the bench's exhaustive reference (no code shared with the solvers): the bytes
    phase 2 loads are the fewest any plan within the slack loads, at slack 0, 5 % and 50 %,
    and the chosen plan's step time is within the slack of phase 1's."""
    problem, previous = _random_case(seed)
    phase1 = plan(problem, method="cp-sat", time_limit_s=5.0)
    for slack in (0.0, 0.05, 0.5):
        ref = minimal_moves(problem, previous, slack)
        assert ref is not None
        assert phase1.evaluation.step_ms == pytest.approx(ref.step_ms, rel=1e-9)
        chosen = keep_resident(problem, phase1, previous, slack)
        limit = phase1.evaluation.step_ms * (1 + slack) * (1 + 1e-9)
        assert chosen.evaluation.step_ms <= limit
        assert bytes_moved(previous, chosen.stages)[0] == ref.bytes_minimal, (slack, ref)


def test_full_means_others_took_most_of_the_headroom() -> None:
    """The simulator's workload phases took a device down to 3.55 GiB free of 80 with no fault
    (bench heal, 10 minutes): not full. Its fill fault (98 % used) is."""
    total = 80 * GIB
    stages = _outcome(
        Problem(_tiny(), Fleet(devices=(_dev("a/0", 1000.0, 80),)), 1000, 1, headroom=0.0),
        (StagePlan(_dev("a/0", 1000.0, 80), 0, 4),),
    ).stages
    cfg = health.HealConfig()
    swing = {"a/0": kit.device_with_free(int(3.55 * GIB), total)}
    assert health.getting_full(stages, swing, cfg, headroom=0.1) is None
    filled = {"a/0": kit.device_with_free(total - int(0.98 * total), total)}
    reason = health.getting_full(stages, filled, cfg, headroom=0.1)
    assert reason is not None and "a/0 is full" in reason
