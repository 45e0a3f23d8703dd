"""Cost model, exo's split, the packer, CP-SAT, the integer bound and the validator, checked
against the exhaustive exact search on small fleets."""

from __future__ import annotations

import random
from dataclasses import replace

import msgspec
import pytest

from shardplane.bus.messages import ModelCard
from shardplane.planner import validate
from shardplane.planner.bounds import integer_bound_ms
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
from shardplane.planner.exact import exact_plan
from shardplane.planner.fleet import Device, Fleet, Link, build_fleet
from shardplane.planner.greedy import allocate_layers_proportionally, greedy_plan, proportional_plan
from shardplane.planner.plan import PlanError, is_homogeneous, plan, to_stages
from shardplane.planner.profile import ModelProfile, profile_from_card
from shardplane.planner.solver import solve
from shardplane.planner.synthetic import HostSpec, random_hosts, states

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
    node, _, idx = ref.partition("/")
    return Device(
        ref=ref,
        node=node,
        index=int(idx),
        gpu="g",
        bandwidth_gbps=bw,
        total_bytes=int(gib * GIB),
        free_bytes=int(gib * GIB),
    )


def _tiny(layers: int = 4) -> ModelProfile:
    # 1 GB layers, 0.5 GB embed/head, 1000 B of KV per token per layer, hidden 1000.
    return ModelProfile(
        name="t",
        layer_bytes=(10**9,) * layers,
        kv_bytes_per_token=(1000,) * layers,
        embed_bytes=5 * 10**8,
        head_bytes=5 * 10**8,
        hidden=1000,
    )


def test_worked_example_of_the_cost_model() -> None:
    """The README's worked example, by hand."""
    a, b = _dev("a/0", 1000.0, 80), _dev("b/0", 500.0, 80)
    fleet = Fleet(devices=(a, b), node_links={("a", "b"): Link(10.0 / 8, 0.2)})
    p = Problem(_tiny(), fleet, context_tokens=1000, batch=2, headroom=0.0)
    ev = evaluate(p, (StagePlan(a, 0, 3), StagePlan(b, 3, 4)))
    # a: 3 GB weights + 3 layers x 1000 B x 1000 tokens x 2 = 3.006 GB at 1000 GB/s = 3.006 ms
    assert ev.stage_ms[0] == pytest.approx(3.006)
    # hop: 1000 hidden x 2 B x batch 2 = 4000 B over 1.25 GB/s = 0.0032 ms + 0.2 ms latency
    assert ev.hop_ms[0] == pytest.approx(0.2032)
    # b: 1 GB + 2 MB KV + 0.5 GB head at 500 GB/s = 3.004 ms; no hop after the last stage
    assert ev.stage_ms[1] == pytest.approx(3.004)
    assert ev.hop_ms[1] == 0.0
    assert ev.bottleneck_ms == pytest.approx(3.2092)
    assert ev.latency_ms == pytest.approx(3.006 + 0.2032 + 3.004)
    # memory: weights + KV + workspace, + embeddings on the first stage, head on the last
    assert ev.memory[0] == 3 * 10**9 + 6 * 10**6 + WORKSPACE_BYTES + 5 * 10**8
    assert ev.memory[1] == 10**9 + 2 * 10**6 + WORKSPACE_BYTES + 5 * 10**8
    # fluid bound: all bytes read per step over all bandwidth
    assert lower_bound_ms(p) == pytest.approx((4e9 + 8e6 + 5e8) / 1500e9 * 1e3)


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
    best = out.evaluation.bottleneck_ms
    assert integer_bound_ms(p, best) <= best * (1 + 1e-9)
    alone = solve(p, hint=None, time_limit_s=10.0).plan  # CP-SAT's own model, no hint to keep
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
    seed: int, n: int, model: str = "llama-3.1-8b", ctx: int = 8192, objective: str = "throughput"
) -> Problem:
    rng = random.Random(seed)
    hosts = random_hosts(
        n, seed=seed, gpus=rng.sample(GPUS, 4), per_host=(1, 3), fast_links=1 if seed % 2 else 0
    )
    devs, nodes = states(hosts)
    return Problem(resolve(model), build_fleet(devs, nodes), ctx, 1, objective=objective)


@pytest.mark.parametrize("seed", range(6))
def test_cp_sat_matches_exhaustive_search(seed: int) -> None:
    model = ("llama-3.1-8b", "llama-3.1-70b-q4", "qwen2.5-7b")[seed % 3]
    p = _random_problem(seed, 3 + seed % 3, model, ctx=(4096, 32768)[seed % 2])
    exact = exact_plan(p)
    assert exact is not None
    best = evaluate(p, exact).bottleneck_ms
    out = plan(p, time_limit_s=10.0)
    assert out.evaluation.bottleneck_ms <= best * 1.01
    assert out.status == "optimal"
    assert out.evaluation.bottleneck_ms == pytest.approx(best, rel=1e-3)
    # the integer bound never exceeds the optimum, the fluid bound never exceeds it
    assert integer_bound_ms(p, best) <= best * (1 + 1e-9)
    assert lower_bound_ms(p) <= best


def test_latency_objective_matches_exhaustive_search() -> None:
    p = _random_problem(11, 4, "llama-3.1-8b", objective="latency")
    exact = exact_plan(p)
    assert exact is not None
    out = plan(p, time_limit_s=10.0)
    assert out.evaluation.latency_ms == pytest.approx(evaluate(p, exact).latency_ms, rel=1e-3)


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
    p = Problem(prof, build_fleet(devs, nodes), 4096, 1)
    exact = exact_plan(p)
    assert exact is not None
    out = plan(p, time_limit_s=10.0)
    assert out.evaluation.bottleneck_ms == pytest.approx(evaluate(p, exact).bottleneck_ms, rel=1e-3)
    # Every layer once, plus the embeddings (first stage) and the head (last stage), untied.
    assert (
        sum(s.weight_bytes for s in out.stages) == sum(sizes) + prof.embed_bytes + prof.head_bytes
    )
    assert [s.weight_bytes for s in out.stages] == [
        sum(sizes[s.layer_start : s.layer_end]) + prof.end_bytes(s.embeddings, s.head)
        for s in out.stages
    ]


def test_homogeneous_fleet_even_split_without_solver() -> None:
    hosts = [HostSpec(f"h{i}", ("A100-80GB", "A100-80GB")) for i in range(2)]
    devs, nodes = states(hosts)
    p = Problem(resolve("llama-3.1-70b"), build_fleet(devs, nodes), 8192, 1)
    assert is_homogeneous(p)
    out = plan(p, use_solver=False)
    assert out.solver == "even-split" and out.status == "optimal"
    counts = [s.layer_end - s.layer_start for s in out.stages]
    assert max(counts) - min(counts) <= 3  # even, but the head makes the last stage lighter
    exact = exact_plan(p)
    assert exact is not None
    assert out.evaluation.bottleneck_ms == pytest.approx(evaluate(p, exact).bottleneck_ms, rel=1e-6)


def test_homogeneous_equal_layers_no_head_is_literally_even() -> None:
    prof = replace(_tiny(8), embed_bytes=0, head_bytes=0)
    devs = tuple(_dev(f"n{i}/0", 1000.0, 80) for i in range(4))
    p = Problem(prof, Fleet(devices=devs), 1000, 1)
    out = plan(p)
    assert out.solver == "even-split"
    assert [s.layer_end - s.layer_start for s in out.stages] == [2, 2, 2, 2]


def test_never_worse_than_proportional_and_feasible_where_it_is_not() -> None:
    # A tight fleet: exo's memory split ignores the KV cache and the head and overflows.
    devs, nodes = states(
        [
            HostSpec("a", ("RTX-4090",)),
            HostSpec("b", ("RTX-3090",)),
            HostSpec("c", ("RTX-3060-12GB",)),
            HostSpec("d", ("A10",)),
        ]
    )
    p = Problem(resolve("llama-3.1-8b"), build_fleet(devs, nodes), 131072, 1)
    prop = proportional_plan(p)
    out = plan(p)
    ev = evaluate(p, prop)
    if ev.fits:
        assert out.evaluation.bottleneck_ms <= ev.bottleneck_ms
    assert out.evaluation.fits


def test_validator_rejects_bad_plans() -> None:
    p = _random_problem(3, 3)
    out = plan(p)
    good = out.stages
    validate.check(p, good, out.evaluation.bottleneck_ms)
    gap = (msgspec.structs.replace(good[0], layer_end=good[0].layer_end - 1), *good[1:])
    with pytest.raises(validate.InvalidPlan, match="starts at layer"):
        validate.check(p, gap, out.evaluation.bottleneck_ms)
    fudged = (msgspec.structs.replace(good[0], stage_ms=good[0].stage_ms * 0.5), *good[1:])
    with pytest.raises(validate.InvalidPlan, match="cost model gives"):
        validate.check(p, fudged, out.evaluation.bottleneck_ms)
    with pytest.raises(validate.InvalidPlan, match="bottleneck_ms"):
        validate.check(p, good, out.evaluation.bottleneck_ms * 0.9)
    # One device holding everything: it does not fit, and the message has the numbers.
    big = Problem(resolve("llama-3.1-70b"), p.fleet, 8192, 1)
    one = evaluate(big, (StagePlan(big.devices[0], 0, big.layers),), Tables(big))
    with pytest.raises(validate.InvalidPlan, match=r"GiB usable; stage needs \d+\.\d+ GiB"):
        validate.check(big, to_stages(big, one), one.bottleneck_ms)


def test_insufficient_memory_names_numbers() -> None:
    devs, nodes = states([HostSpec("small", ("RTX-3060-12GB",))])
    p = Problem(resolve("llama-3.1-70b"), build_fleet(devs, nodes), 8192, 1)
    with pytest.raises(
        PlanError, match=r"needs at least \d+\.\d GiB .*small/0 \d+\.\d GiB"
    ) as info:
        plan(p)
    assert info.value.code == "insufficient_memory"


def test_solver_time_limit_falls_back_or_reports_gap() -> None:
    p = _random_problem(5, 16, "llama-3.1-70b")
    out = plan(p, time_limit_s=0.01)
    assert out.evaluation.fits
    assert out.status in ("optimal", "feasible")
    if out.status == "feasible":
        assert out.gap_pct is not None and out.gap_pct >= 0


def test_multi_gpu_hosts_use_every_gpu() -> None:
    devs, nodes = states([HostSpec("big", ("RTX-4090",) * 4), HostSpec("other", ("A10",))])
    p = Problem(resolve("llama-3.1-70b-q4"), build_fleet(devs, nodes), 8192, 1)
    out = plan(p)
    assert sum(1 for s in out.stages if s.node == "big") == 4
    # devices of one node stay contiguous in the pipeline
    nodes_seq = [s.node for s in out.stages]
    assert nodes_seq == sorted(nodes_seq, key=nodes_seq.index)


def test_greedy_plans_fit() -> None:
    for seed in range(5):
        p = _random_problem(seed, 8, "llama-3.1-70b")
        g = greedy_plan(p)
        if g is not None:
            assert evaluate(p, g).fits
            assert (
                stages_from_counts([s.device for s in g], [s.layer_end - s.layer_start for s in g])
                == g
            )


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_cp_sat_alone_without_hint_proves_the_optimum(seed: int) -> None:
    from shardplane.planner.solver import solve

    p = _random_problem(seed, 4, "llama-3.1-8b", ctx=16384)
    exact = exact_plan(p)
    assert exact is not None
    result = solve(p, hint=None, time_limit_s=20.0)
    assert result.plan is not None and result.status == "optimal"
    assert evaluate(p, result.plan).bottleneck_ms == pytest.approx(
        evaluate(p, exact).bottleneck_ms, rel=1e-3
    )


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_bound_matches_reference(seed: int) -> None:
    from shardplane.planner.bounds import _Prep, _Vec, caps_reference  # pyright: ignore[reportPrivateUsage]

    p = _random_problem(seed, 2 + seed * 2, ("llama-3.1-8b", "llama-3.1-70b-q4")[seed % 2])
    pp = _Prep(p, Tables(p))
    vec = _Vec(pp)
    rng = random.Random(seed)
    for _ in range(40):
        T = rng.uniform(0.1, 60.0)
        assert vec.caps(T) == caps_reference(pp, T), T


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
    assert out.evaluation.fits and out.stages[-1].layer_end == 126
    assert out.bound_ms is not None and out.evaluation.bottleneck_ms >= out.bound_ms


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
