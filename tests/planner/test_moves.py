"""Minimal moves (phase 2 over candidate plans) and the controller's hysteresis, pure."""

from __future__ import annotations

import random

from shardplane.planner import health
from shardplane.planner.cost import Problem, StagePlan, evaluate
from shardplane.planner.fleet import Fleet
from shardplane.planner.moves import bytes_moved, keep_resident
from shardplane.planner.plan import Outcome, to_stages
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


def test_a_lost_stage_moves_alone_when_an_equal_plan_keeps_the_rest() -> None:
    a, b, c, d = (_dev(f"{n}/0", 1000.0, 8) for n in "abcd")
    before = Problem(_tiny(), Fleet(devices=(a, b)), 1000, 1, headroom=0.0)
    previous = _outcome(before, (StagePlan(a, 0, 2), StagePlan(b, 2, 4))).stages
    # b is lost; the solver's plan (equally fast) happens to move both stages.
    after = Problem(_tiny(), Fleet(devices=(a, c, d)), 1000, 1, headroom=0.0)
    phase1 = _outcome(after, (StagePlan(c, 0, 2), StagePlan(d, 2, 4)))
    assert bytes_moved(previous, phase1.stages)[1] == 0
    chosen = keep_resident(after, phase1, previous, 0.05)
    moved, kept = bytes_moved(previous, chosen.stages)
    assert chosen.stages[0].device == "a/0" and (chosen.stages[0].layer_end == 2)
    assert kept == previous[0].weight_bytes and moved == chosen.stages[1].weight_bytes
    assert chosen.evaluation.bottleneck_ms <= phase1.evaluation.bottleneck_ms * 1.05


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
