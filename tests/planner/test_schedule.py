"""The decode schedule: hand-computed cases (planner/README.md's worked example), the closed form
P(M) against a discrete-event simulation, and the planner's choice of M and of stages."""

from __future__ import annotations

import itertools
import random

import pytest

from shardplane.bench._schedule_sim import simulate, split
from shardplane.planner import schedule, validate
from shardplane.planner.cost import Problem, StagePlan, Tables, evaluate, schedule_of
from shardplane.planner.fleet import Device, Fleet, Link
from shardplane.planner.plan import plan, to_stages
from shardplane.planner.profile import ModelProfile
from tests.planner.fleetkit import device

GB = 10**9


def _dev(ref: str, bw: float, tflops: float = 100.0) -> Device:
    return device(ref, bw, tflops=tflops)


def _tiny() -> ModelProfile:
    """Four 1 GB layers, 0.5 GB embeddings and head, 1,000 B of KV per token per layer, hidden
    1,000; no parameter count, so 2 bytes per parameter (1 GFLOP per layer per token)."""
    return ModelProfile(
        name="tiny",
        layer_bytes=(GB,) * 4,
        kv_bytes_per_token=(1000,) * 4,
        embed_bytes=GB // 2,
        head_bytes=GB // 2,
        hidden=1000,
    )


A, B_, C = _dev("a/0", 1000.0), _dev("b/0", 500.0), _dev("c/0", 1000.0)
LINK = Link(10.0 / 8, 0.2)  # 10 Gbit/s, 0.2 ms
FLEET = Fleet(devices=(A, B_, C), default_link=LINK)


def test_adding_a_stage_is_worse_at_batch_1() -> None:
    """README, case 1: context 1,000, batch 1."""
    p = Problem(_tiny(), FLEET, context_tokens=1000, batch=1, headroom=0.0)
    one = evaluate(p, (StagePlan(A, 0, 4),))
    # 4 GB + 4 x 1,000 B x 1,000 tokens + 0.5 GB head = 4.504 GB at 1,000 GB/s; no hops
    assert one.stage_ms == pytest.approx((4.504,))
    assert one.hop_ms == (0.0,)
    assert one.step_ms == pytest.approx(4.504)
    assert one.tokens_per_s == pytest.approx(1000 / 4.504)
    two = evaluate(p, (StagePlan(A, 0, 3), StagePlan(B_, 3, 4)))
    assert two.stage_ms == pytest.approx((3.003, 3.002))  # (1 GB + 1 MB + 0.5 GB) / 500 GB/s
    # hop: 1,000 x 2 B / 1.25 GB/s + 0.2 ms; return: 4 B of token id / 1.25 GB/s + 0.2 ms
    assert two.hop_ms == pytest.approx((0.2016, 0.2000032))
    assert two.step_ms == pytest.approx(6.4066032)
    assert two.microbatches == 1  # one sequence cannot be split
    # The old objective (the slowest stage plus its hop as the rate) called this the faster plan.
    assert max(two.stage_ms[0] + two.hop_ms[0], two.stage_ms[1]) < one.step_ms
    out = plan(p, time_limit_s=10.0)
    assert [s.device for s in out.stages] == ["a/0"] and out.status == "optimal"


def test_micro_batching_pays_when_the_kv_cache_dominates() -> None:
    """README, case 2: context 250,000, batch 8; a and c alike, 100 TFLOPS each."""
    p = Problem(_tiny(), FLEET, context_tokens=250_000, batch=8, headroom=0.0)
    stages = (StagePlan(A, 0, 2), StagePlan(C, 2, 4))
    m1 = schedule_of(p, stages, 1)
    # b = 8: 2 x (1 GB + 8 x 0.25 GB) = 6 GB -> 6 ms; + 0.5 GB head -> 6.5 ms
    assert m1.stage_ms == pytest.approx((6.0, 6.5))
    assert m1.hop_ms == pytest.approx((0.2128, 0.2000256))
    assert m1.step_ms == pytest.approx(12.9128256)
    m2 = schedule_of(p, stages, 2)
    # b = 4: 2 x (1 GB + 4 x 0.25 GB) = 4 ms, 4.5 ms; FLOPs 2 layers x 4 x 2 GFLOP = 16 GFLOP
    # at 100 TFLOPS = 0.16 ms: memory-bound
    assert m2.stage_ms == pytest.approx((4.0, 4.5))
    assert m2.cycle_ms == pytest.approx(8.9064128)
    assert m2.step_ms == pytest.approx(9.0)  # 2 x 4.5 ms > the round trip
    assert m2.tokens_per_s == pytest.approx(8000 / 9.0)
    alone = evaluate(p, (StagePlan(A, 0, 4),))
    assert alone.step_ms == pytest.approx(12.5)  # 4 x 3 GB + 0.5 GB
    ev = evaluate(p, stages)
    assert ev.microbatches == 2 and ev.step_ms == pytest.approx(9.0)
    out = plan(p, time_limit_s=10.0)
    assert out.evaluation.microbatches == 2
    assert out.evaluation.step_ms == pytest.approx(9.0)
    assert sorted(s.device for s in out.stages) == ["a/0", "c/0"]
    # latency means M = 1, and then one device is best; llama.cpp's M = 1 likewise
    assert (
        evaluate(Problem(_tiny(), FLEET, 250_000, 8, 0.0, objective="latency"), stages).microbatches
        == 1
    )
    fixed = plan(Problem(_tiny(), FLEET, 250_000, 8, 0.0, microbatches=1), time_limit_s=10.0)
    assert [s.device for s in fixed.stages] == ["a/0"]
    assert fixed.evaluation.step_ms == pytest.approx(12.5)


def test_compute_bound_stage() -> None:
    """t_s = max(read / BW, FLOPs / FLOPS): a slow-arithmetic device is compute-bound."""
    slow = _dev("s/0", 1000.0, tflops=1.0)
    p = Problem(_tiny(), Fleet(devices=(slow,)), context_tokens=1000, batch=64, headroom=0.0)
    ev = evaluate(p, (StagePlan(slow, 0, 4),))
    # per token: 4 x (1 GFLOP + 4 x 1,000 x 1,000) + head 0.5 GFLOP = 4.516 GFLOP; x 64 at 1 TFLOPS
    assert ev.stage_ms[0] == pytest.approx(64 * 4.516e9 / 1e9)
    assert schedule.stage_ms(10.0, 0.0, 1.0, 0.0) == pytest.approx(1e-5)  # unknown TFLOPS: reads


def test_microbatch_choices() -> None:
    assert schedule.microbatch_choices(1, 7) == (1,)
    assert schedule.microbatch_choices(8, 3) == (1, 2, 3)
    # 64 over up to 16 stages: of M giving the same ceil(64 / M), only the smallest
    assert schedule.microbatch_choices(64, 16) == (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16)
    assert schedule.engine_microbatches("llamacpp") == 1
    assert schedule.engine_microbatches("vllm") == "stages"


@pytest.mark.parametrize("seed", range(25))
def test_closed_form_matches_simulation(seed: int) -> None:
    """P(M) = max(sum(t + h), M x max t) against the event simulation, random plans."""
    rng = random.Random(seed)
    stages = rng.randint(1, 6)
    t = [rng.uniform(0.5, 10.0) for _ in range(stages)]
    h = [rng.choice((0.0, rng.uniform(0.0, 3.0))) for _ in range(stages)]
    m = rng.randint(1, stages)
    closed = schedule.step_ms(t, h, m)
    sim = simulate(lambda s, b: t[s], lambda s, b: h[s], [1] * m, stages)
    assert sim == pytest.approx(closed, rel=0.02)


@pytest.mark.parametrize("seed", range(12))
def test_planned_schedules_match_simulation(seed: int) -> None:
    """Real plans of the tiny model: the closed form matches the simulation with equal
    micro-batches, and never claims more than uneven ones deliver."""
    rng = random.Random(100 + seed)
    devs = tuple(
        _dev(f"n{i}/0", rng.choice((300.0, 900.0, 2000.0)), rng.choice((0.0, 20.0)))
        for i in range(4)
    )
    fleet = Fleet(devices=devs, default_link=Link(rng.choice((1.25, 12.5)), rng.uniform(0.01, 0.5)))
    batch = rng.choice((1, 4, 8, 12))
    p = Problem(_tiny(), fleet, rng.choice((1000, 100_000, 250_000)), batch, headroom=0.0)
    cuts = sorted(rng.sample(range(1, 4), rng.randint(0, 3)))
    bounds = [0, *cuts, 4]
    stages = tuple(StagePlan(devs[i], a, e) for i, (a, e) in enumerate(itertools.pairwise(bounds)))
    t = Tables(p)
    for m in p.m_choices(len(stages)):
        claimed = schedule_of(p, stages, m, t)

        def stage_ms(s: int, b: int) -> float:
            return t.micro_tables(b).stage_ms(
                stages[s].device, stages[s].layer_start, stages[s].layer_end
            )

        def hop_ms(s: int, b: int) -> float:
            tb = t.micro_tables(b)
            if s + 1 < len(stages):
                return tb.hop(stages[s].device, stages[s + 1].device)
            return tb.return_hop(stages[s].device, stages[0].device)

        even = simulate(stage_ms, hop_ms, [claimed.micro_batch] * m, len(stages))
        assert even == pytest.approx(claimed.step_ms, rel=0.02)
        uneven = simulate(stage_ms, hop_ms, split(batch, m), len(stages))
        assert batch / uneven >= claimed.tokens_per_s / 1000 * (1 - 1e-9)


def test_reply_stages_recompute_the_step_at_m1() -> None:
    """stage_ms/hop_ms in a reply are t_s(B)/h_s(B), the last hop the return: at M = 1 the step
    time is their sum, and the validator checks every figure."""
    p = Problem(_tiny(), FLEET, context_tokens=1000, batch=1, headroom=0.0, min_stages=2)
    out = plan(p, time_limit_s=10.0)
    assert len(out.stages) >= 2
    assert out.evaluation.step_ms == pytest.approx(sum(s.stage_ms + s.hop_ms for s in out.stages))
    ev = out.evaluation
    validate.check(p, to_stages(p, ev), microbatches=ev.microbatches, step_ms=ev.step_ms)
    with pytest.raises(validate.InvalidPlan, match="step_ms"):
        validate.check(p, out.stages, microbatches=1, step_ms=ev.step_ms * 0.9)
    with pytest.raises(validate.InvalidPlan, match="micro-batches is not allowed"):
        validate.check(p, out.stages, microbatches=2)
