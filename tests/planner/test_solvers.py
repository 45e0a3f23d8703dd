"""Cost model, exo's split, the packer, CP-SAT, the integer bound and the validator, checked
against the exhaustive exact search on small fleets."""

from __future__ import annotations

import random
from dataclasses import replace

import msgspec
import pytest

from shardplane.bus.messages import ModelCard, Objective
from shardplane.planner import validate
from shardplane.planner.bounds import integer_bound_ms, step_bound_ms
from shardplane.planner.catalog import resolve
from shardplane.planner.cost import (
    WORKSPACE_BYTES,
    Problem,
    StagePlan,
    Tables,
    evaluate,
    lower_bound_ms,
    stages_from_counts,
)
from shardplane.planner.exact import exact_search
from shardplane.planner.fleet import Device, Fleet, build_fleet
from shardplane.planner.greedy import (
    allocate_layers_proportionally,
    exo_plan,
    greedy_plan,
    single_device_plans,
)
from shardplane.planner.plan import PlanError, plan, to_stages
from shardplane.planner.profile import ModelProfile, profile_from_card
from shardplane.planner.solver import solve
from shardplane.planner.synthetic import HostSpec, random_hosts, states
from tests.planner import fleetkit
from tests.planner.fleetkit import DEMO as DEMO_HOSTS

GIB = 1024**3
GPUS = [
    "A100-80GB",
    "RTX-4090",
    "RTX-3090",
    "L40S",
    "A10",
    "H100-SXM",
    "MI250X",
    "T4",
    "V100-32GB",
    "RTX-3060-12GB",
]


def _dev(ref: str, bw: float, gib: float) -> Device:
    return fleetkit.device(ref, bw, gib=gib)


def _tiny(layers: int = 4) -> ModelProfile:
    return fleetkit.gb_layers(layers, name="t", ends_bytes=5 * 10**8, hidden=1000)


def test_a_single_stage_holds_a_tied_matrix_once() -> None:
    """Tied embeddings: the head is the embedding matrix. Split, the first stage holds it as the
    embeddings and the last as the head (twice in all); one stage holding the whole model holds
    it once, as the worker loads it once. Device a fits the model only counted once, and every
    path (packer, integer bound, CP-SAT, validator) must agree that it does."""
    matrix, norm = 2 * 10**9, 1000
    prof = replace(_tiny(4), embed_bytes=matrix, head_bytes=matrix + norm, tied_bytes=matrix)
    weights = 4 * 10**9 + matrix + norm
    need = weights + 4 * 1000 * 1000 + WORKSPACE_BYTES  # KV: 4 layers x 1000 B x 1000 tokens
    a = replace(_dev("a/0", 1000.0, 80), total_bytes=need, free_bytes=need)
    b = _dev("b/0", 10.0, 80)  # slow: any stage on it costs 100 ms per layer
    p = Problem(prof, Fleet(devices=(a, b)), context_tokens=1000, batch=1, headroom=0.0)
    for method in ("auto", "cp-sat"):
        out = plan(p, method=method, time_limit_s=10.0)
        assert [(s.device, s.layer_start, s.layer_end) for s in out.stages] == [("a/0", 0, 4)]
        assert out.stages[0].weight_bytes == weights
        assert out.stages[0].memory_bytes == need
        assert out.status == "optimal", method
    best = out.evaluation.step_ms
    assert integer_bound_ms(p) <= best * (1 + 1e-9)
    alone = solve(p, 1, hint=None, time_limit_s=10.0).plan  # CP-SAT's own model, no hint
    assert alone is not None and [(s.device.ref, s.layer_start, s.layer_end) for s in alone] == [
        ("a/0", 0, 4)
    ]
    split = evaluate(p, (StagePlan(b, 0, 1), StagePlan(a, 1, 4)))
    assert sum(split.weight_bytes) == weights + matrix


def test_exo_rule_faithful() -> None:
    assert allocate_layers_proportionally(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    # largest remainder: 32 x (0.45, 0.35, 0.2) = 14.4, 11.2, 6.4 -> 14, 11, 6 + 1 to the 0.4s
    assert allocate_layers_proportionally(32, [0.45, 0.35, 0.2]) == [15, 11, 6]
    # a node left with 0 takes one from the node with the most
    assert allocate_layers_proportionally(10, [0.97, 0.02, 0.01]) == [8, 1, 1]
    assert sum(allocate_layers_proportionally(80, [80, 24, 24, 12, 24, 64, 64])) == 80


def _random_problem(
    seed: int,
    n: int,
    model: str = "llama-3.1-8b",
    ctx: int = 8192,
    objective: Objective = "throughput",
    batch: int = 1,
) -> Problem:
    rng = random.Random(seed)
    hosts = random_hosts(
        n, seed=seed, gpus=rng.sample(GPUS, 4), per_host=(1, 3), fast_links=1 if seed % 2 else 0
    )
    devs, nodes = states(hosts)
    return Problem(resolve(model), build_fleet(devs, nodes), ctx, batch, objective=objective)


def _exact_step(p: Problem) -> float:
    found = exact_search(p)
    assert found is not None
    return found[2]


@pytest.mark.parametrize("seed", range(6))
def test_cp_sat_matches_exhaustive_search(seed: int) -> None:
    """CP-SAT itself (forced: no greedy shortcut) against the brute force, which shares no code
    with it, at batch 1 (M = 1) and batch 8 (M chosen)."""
    model = ("llama-3.1-8b", "llama-3.1-70b-q4", "qwen2.5-7b")[seed % 3]
    p = _random_problem(
        seed, 3 + seed % 2, model, ctx=(4096, 32768)[seed % 2], batch=(1, 8)[seed // 3]
    )
    best = _exact_step(p)
    out = plan(p, time_limit_s=10.0, method="cp-sat")
    assert out.solver == "cp-sat"
    assert out.status == "optimal"
    assert out.evaluation.step_ms == pytest.approx(best, rel=1e-3)
    # the bounds never exceed the optimum
    assert integer_bound_ms(p) <= best * (1 + 1e-9)
    assert lower_bound_ms(p) <= best


@pytest.mark.parametrize("seed", range(8))
def test_default_method_matches_exhaustive_search(seed: int) -> None:
    """The service's path (greedy, proofs, CP-SAT when needed) at batch 1, 8 and 64."""
    batch = (1, 8, 64)[seed % 3]
    ctx = 4096 if batch == 64 else (4096, 32768)[seed % 2]
    p = _random_problem(20 + seed, 2 + seed % 3, "llama-3.1-8b", ctx=ctx, batch=batch)
    best = _exact_step(p)
    out = plan(p, time_limit_s=10.0)
    assert out.evaluation.step_ms == pytest.approx(best, rel=1e-3)
    assert out.evaluation.step_ms >= best * (1 - 1e-9)
    assert integer_bound_ms(p) <= best * (1 + 1e-9)


def test_latency_objective_matches_exhaustive_search() -> None:
    p = _random_problem(11, 4, "llama-3.1-8b", objective="latency", batch=8)
    out = plan(p, time_limit_s=10.0)
    assert out.evaluation.microbatches == 1
    assert out.evaluation.step_ms == pytest.approx(_exact_step(p), rel=1e-3)


def test_solver_chooses_micro_batches_where_they_pay() -> None:
    """Batch 32 at 8k: the KV cache is most of the reads, so the plan pipelines and runs M > 1;
    the same request at M = 1 (llama.cpp) delivers less, at M = stages (vLLM) no more."""
    devs, nodes = states(
        [HostSpec("a", ("A100-80GB",)), HostSpec("b", ("L40S", "L40S")), HostSpec("c", ("A10",))]
    )
    fleet = build_fleet(devs, nodes)
    p = Problem(resolve("llama-3.1-8b"), fleet, 8192, 32)
    best = _exact_step(p)
    out = plan(p, time_limit_s=10.0, method="cp-sat")
    assert out.evaluation.microbatches > 1 and len(out.stages) > 1
    assert out.evaluation.step_ms == pytest.approx(best, rel=1e-3)
    one = plan(replace(p, microbatches=1), time_limit_s=10.0)
    assert one.evaluation.microbatches == 1
    assert one.evaluation.step_ms > out.evaluation.step_ms
    per_stage = plan(replace(p, microbatches="stages"), time_limit_s=10.0)
    assert per_stage.evaluation.microbatches == min(32, len(per_stage.stages))
    assert per_stage.evaluation.step_ms >= out.evaluation.step_ms * (1 - 1e-9)


def test_request_limits_on_stages_and_micro_batches() -> None:
    p = _random_problem(3, 4, "llama-3.1-8b", batch=4)
    forced = plan(replace(p, min_stages=3), time_limit_s=10.0)
    assert len(forced.stages) >= 3
    fixed = plan(replace(p, microbatches=2), time_limit_s=10.0)
    assert fixed.evaluation.microbatches == 2 and len(fixed.stages) >= 2
    with pytest.raises(PlanError, match="microbatches=8 exceeds batch=4") as info:
        plan(replace(p, microbatches=8))
    assert info.value.code == "invalid_request"
    with pytest.raises(PlanError, match="at least 9 stages") as info:
        plan(replace(p, min_stages=9))
    assert info.value.code == "invalid_request"


def test_unequal_layers_use_real_sizes() -> None:
    base = profile_from_card(
        resolve("llama-3.1-8b")
        and ModelCard(
            name="x", layers=12, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000
        )
    )
    sizes = tuple(b * (3 if i in (2, 3) else 1) for i, b in enumerate(base.layer_bytes))
    prof = replace(base, layer_bytes=sizes)
    devs, nodes = states(
        [HostSpec("a", ("RTX-4090",)), HostSpec("b", ("RTX-3090",)), HostSpec("c", ("A10",))]
    )
    p = Problem(prof, build_fleet(devs, nodes), 4096, 1, min_stages=2)
    out = plan(p, time_limit_s=10.0, method="cp-sat")
    assert out.evaluation.step_ms == pytest.approx(_exact_step(p), rel=1e-3)
    # Every layer once, plus the embeddings (first stage) and the head (last stage), untied.
    assert (
        sum(s.weight_bytes for s in out.stages) == sum(sizes) + prof.embed_bytes + prof.head_bytes
    )
    assert [s.weight_bytes for s in out.stages] == [
        sum(sizes[s.layer_start : s.layer_end]) + prof.end_bytes(s.embeddings, s.head)
        for s in out.stages
    ]


def test_homogeneous_fleet_is_proven_optimal() -> None:
    hosts = [HostSpec(f"h{i}", ("A100-40GB", "A100-40GB")) for i in range(2)]
    devs, nodes = states(hosts)
    p = Problem(resolve("llama-3.1-70b-q4"), build_fleet(devs, nodes), 8192, 8)
    out = plan(p, time_limit_s=10.0)
    assert out.status == "optimal"
    assert out.evaluation.step_ms == pytest.approx(_exact_step(p), rel=1e-6)


def test_exo_baseline_is_exos_rule() -> None:
    """exo uses one device per host and keeps the smallest set of hosts whose memory holds the
    weights (the ones with the most memory), then splits by memory: a model that fits one
    device stays on it."""
    devs, nodes = states(
        [
            HostSpec("a", ("RTX-4090",)),
            HostSpec("b", ("A100-80GB",)),
            HostSpec("c", ("L40S", "L40S")),
            HostSpec("d", ("A100-40GB",)),
        ]
    )
    fleet = build_fleet(devs, nodes)
    small = exo_plan(Problem(resolve("llama-3.1-8b"), fleet, 8192, 1))
    assert [s.device.ref for s in small] == ["b/0"]  # the most memory of any host's device
    big = exo_plan(Problem(resolve("llama-3.1-70b"), fleet, 8192, 1))
    # 131 GiB of weights: b (72 GiB usable) and one L40S of c (43.2) are not enough, d (36) is
    assert [s.device.ref for s in big] == ["b/0", "c/0", "d/0"]
    usable = [fleet.devices[i].usable_bytes(0.1) for i in (1, 2, 4)]
    assert [s.layer_end - s.layer_start for s in big] == allocate_layers_proportionally(80, usable)


def test_feasible_where_exos_split_does_not_fit() -> None:
    """A tight fleet: exo's memory split ignores the KV cache, the embeddings and the head, and
    overflows a device here (the premise, asserted); the planner still places the model."""
    devs, nodes = states(
        [
            HostSpec("a", ("RTX-4090",)),
            HostSpec("b", ("RTX-3090",)),
            HostSpec("c", ("RTX-3060-12GB",)),
            HostSpec("d", ("A10",)),
        ]
    )
    p = Problem(resolve("llama-3.1-8b"), build_fleet(devs, nodes), 131072, 1)
    exo = exo_plan(p)
    assert exo, "exo's rule picks nodes here"
    assert not evaluate(p, exo).fits  # the premise: exo's split overflows this fleet
    out = plan(p)
    assert out.evaluation.fits


def test_never_worse_than_exo_or_one_device() -> None:
    for seed in range(6):
        p = _random_problem(
            40 + seed,
            4 + seed % 3,
            ("llama-3.1-8b", "llama-3.1-70b-q4")[seed % 2],
            batch=(1, 8, 64)[seed % 3],
        )
        try:
            out = plan(p)
        except PlanError:
            continue
        t = Tables(p)
        exo = exo_plan(p)
        if exo and (ev := evaluate(p, exo, t)).ok:
            assert out.evaluation.step_ms <= ev.step_ms * (1 + 1e-9)
        for one in single_device_plans(p, t):
            assert out.evaluation.step_ms <= evaluate(p, one, t).step_ms * (1 + 1e-9)


def test_validator_rejects_bad_plans() -> None:
    p = _random_problem(3, 3, "llama-3.1-70b-q4")
    out = plan(p)
    good = out.stages
    ev = out.evaluation
    validate.check(p, good, ev.bottleneck_ms, microbatches=ev.microbatches, step_ms=ev.step_ms)
    gap = (msgspec.structs.replace(good[0], layer_end=good[0].layer_end - 1), *good[1:])
    with pytest.raises(validate.InvalidPlan, match=r"starts at layer|not placed"):
        validate.check(p, gap)
    fudged = (msgspec.structs.replace(good[0], stage_ms=good[0].stage_ms * 0.5), *good[1:])
    with pytest.raises(validate.InvalidPlan, match="cost model gives"):
        validate.check(p, fudged)
    with pytest.raises(validate.InvalidPlan, match="bottleneck_ms"):
        validate.check(p, good, ev.bottleneck_ms * 0.9, microbatches=ev.microbatches)
    # One device holding everything: it does not fit, and the message has the numbers.
    big = Problem(resolve("llama-3.1-70b"), p.fleet, 8192, 1)
    one = evaluate(big, (StagePlan(big.devices[0], 0, big.layers),), Tables(big))
    with pytest.raises(validate.InvalidPlan, match=r"GiB usable; stage needs \d+\.\d+ GiB"):
        validate.check(big, to_stages(big, one))


def test_insufficient_memory_names_numbers() -> None:
    devs, nodes = states([HostSpec("small", ("RTX-3060-12GB",))])
    p = Problem(resolve("llama-3.1-70b"), build_fleet(devs, nodes), 8192, 1)
    with pytest.raises(
        PlanError, match=r"needs at least \d+\.\d GiB .*small/0 \d+\.\d GiB"
    ) as info:
        plan(p)
    assert info.value.code == "insufficient_memory"


def test_solver_time_limit_falls_back_or_reports_gap() -> None:
    p = _random_problem(5, 16, "llama-3.1-70b", batch=8)
    out = plan(p, time_limit_s=0.01)
    assert out.evaluation.ok
    assert out.status in ("optimal", "feasible")
    if out.status == "feasible":
        assert out.gap_pct is not None and out.gap_pct >= 0
        assert out.bound_ms is not None and out.bound_ms <= out.evaluation.step_ms * (1 + 1e-9)


def test_node_devices_stay_contiguous() -> None:
    devs, nodes = states([HostSpec("big", ("RTX-4090",) * 4), HostSpec("other", ("A10",))])
    p = Problem(resolve("llama-3.1-70b-q4"), build_fleet(devs, nodes), 4096, 8)
    out = plan(p)
    assert len(out.stages) >= 2
    nodes_seq = [s.node for s in out.stages]
    assert nodes_seq == sorted(nodes_seq, key=nodes_seq.index)


def test_greedy_plans_fit() -> None:
    for seed in range(5):
        p = _random_problem(seed, 8, "llama-3.1-70b", batch=8)
        g = greedy_plan(p)
        if g is not None:
            assert evaluate(p, g).ok
            assert (
                stages_from_counts([s.device for s in g], [s.layer_end - s.layer_start for s in g])
                == g
            )


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_cp_sat_alone_without_hint_proves_the_optimum(seed: int) -> None:
    p = _random_problem(seed, 4, "llama-3.1-8b", ctx=16384, batch=4)
    best = _exact_step(p)
    found: list[float] = []
    for m in p.all_m_choices():
        result = solve(p, m, hint=None, time_limit_s=20.0)
        assert result.status in ("optimal", "infeasible"), m
        if result.plan is not None:
            found.append(evaluate(p, result.plan, microbatches=m).step_ms)
    assert min(found) == pytest.approx(best, rel=1e-3)


@pytest.mark.parametrize("seed", range(8))
def test_bounds_never_exceed_the_optimum(seed: int) -> None:
    p = _random_problem(
        60 + seed,
        2 + seed % 3,
        ("llama-3.1-8b", "qwen2.5-7b")[seed % 2],
        ctx=(4096, 131072)[seed % 2],
        batch=(1, 8, 64, 16)[seed % 4],
    )
    found = exact_search(p)
    if found is None:
        with pytest.raises(PlanError):
            plan(p)
        return
    best = found[2]
    t = Tables(p)
    assert lower_bound_ms(p) <= best * (1 + 1e-9)
    assert integer_bound_ms(p) <= best * (1 + 1e-9)
    for m in p.all_m_choices():
        if m == found[1]:
            assert step_bound_ms(p, m, t) <= best * (1 + 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [64, 256])
def test_scale_plans_stay_fast_and_valid(devices: int) -> None:
    import time

    hosts = random_hosts(devices, seed=devices, gpus=GPUS, fast_links=1)
    devs, nodes = states(hosts)
    p = Problem(resolve("llama-3.1-405b-q4"), build_fleet(devs, nodes), 8192, 1)
    started = time.perf_counter()
    out = plan(p)
    assert time.perf_counter() - started < 2.0
    assert out.evaluation.ok and out.stages[-1].layer_end == 126
    assert out.bound_ms is not None and out.evaluation.step_ms >= out.bound_ms * (1 - 1e-9)


def test_hot_and_offline_devices_are_excluded_with_reasons() -> None:
    from shardplane.planner.synthetic import device_state, node_state

    hot = device_state("a", 0, "RTX-4090", temperature_c=95.0)
    throttled = device_state("a", 1, "RTX-4090", throttle=("hw_thermal_slowdown",))
    gone = device_state("b", 0, "A10", online=False)
    fine = device_state("b", 1, "A10", util_pct=50.0)
    fleet = build_fleet(
        [hot, throttled, gone, fine],
        {"a": node_state(HostSpec("a", ())), "b": node_state(HostSpec("b", ()))},
        exclude_nodes=(),
    )
    reasons = dict(fleet.excluded)
    assert "95 C" in reasons["a/0"] and "thermal" in reasons["a/1"] and "offline" in reasons["b/0"]
    assert [d.ref for d in fleet.devices] == ["b/1"]
    assert fleet.devices[0].bandwidth_gbps == pytest.approx(600.0 * 0.5)  # derated by utilisation
    assert "exclude_nodes" in dict(build_fleet([fine], {}, exclude_nodes=["b"]).excluded)["b/1"]


@pytest.mark.parametrize("free_gib", [10.0, 15.0, 20.0])
def test_max_stages_holds_when_the_fastest_device_only_partly_fits(free_gib: float) -> None:
    """The A100 holds part of the 8B only: splitting it with another device is faster than any
    single device, but max_stages=1 forbids it, so the plan is one whole device (seen when the
    controller re-placed an instance off a filled GPU: the greedy packer's 2-stage plan
    reached the validator)."""
    devices, nodes = states(DEMO_HOSTS)
    filled = [
        msgspec.structs.replace(
            d, sample=msgspec.structs.replace(d.sample, memory_free_bytes=int(free_gib * 2**30))
        )
        if d.sample.node == "rig-a"
        else d
        for d in devices
    ]
    problem = Problem(
        profile=resolve("llama-3.1-8b"),
        fleet=build_fleet(filled, nodes),
        context_tokens=8192,
        batch=1,
        headroom=0.1,
        max_stages=1,
    )
    out = plan(problem)
    assert len(out.stages) == 1
    assert out.stages[0].device != "rig-a/0"
    assert (out.stages[0].layer_start, out.stages[0].layer_end) == (0, 32)
