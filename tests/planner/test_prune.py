"""Pruning dominated nodes (planner.prune) never changes the optimum: the brute force and CP-SAT
find the same best plan with and without the dropped nodes, on random small fleets built so
that pruning has something to drop."""

from __future__ import annotations

import math
import random

import pytest

from shardplane.planner.catalog import resolve
from shardplane.planner.cost import Problem, Tables, evaluate
from shardplane.planner.exact import exact_search
from shardplane.planner.fleet import Device, Fleet, Link, build_fleet
from shardplane.planner.greedy import greedy_evaluation
from shardplane.planner.plan import plan
from shardplane.planner.profile import ModelProfile
from shardplane.planner.prune import node_budget, prune
from shardplane.planner.solver import solve
from shardplane.planner.synthetic import random_hosts, states
from tests.planner import fleetkit

GIB = 1024**3


def _profile(layers: int) -> ModelProfile:
    # 1 GB layers, hidden 4096: a hop between nodes costs about a tenth of a layer on a slow card
    return fleetkit.gb_layers(layers, name="p", ends_bytes=2 * 10**8, hidden=4096)


def _fleet(rng: random.Random) -> Fleet:
    """3-6 nodes of 1-2 devices from a few device kinds, so copies and weaker nodes are common;
    some nodes NVLinked, sometimes one node with a link of its own."""
    kinds = [
        (rng.choice((100.0, 200.0, 400.0)), rng.choice((2, 3, 5)), rng.choice((0.0, 20.0, 80.0)))
        for _ in range(2)
    ]
    devices: list[Device] = []
    total = 0
    names: list[str] = []
    while total < 6 and len(names) < 6:
        name = f"n{len(names)}"
        count = min(6 - total, rng.choice((1, 1, 2)))
        bw, gib, tflops = rng.choice(kinds)
        nvlink = count > 1 and rng.random() < 0.5
        for i in range(count):
            peers = (
                frozenset(f"u-{name}-{j}" for j in range(count) if j != i)
                if nvlink
                else frozenset[str]()
            )
            devices.append(
                Device(
                    ref=f"{name}/{i}",
                    node=name,
                    index=i,
                    gpu="g",
                    bandwidth_gbps=bw,
                    total_bytes=gib * GIB,
                    free_bytes=gib * GIB,
                    uuid=f"u-{name}-{i}",
                    nvlink_peers=peers,
                    tflops=tflops,
                )
            )
        names.append(name)
        total += count
    links: dict[tuple[str, str], Link] = {}
    if len(names) > 2 and rng.random() < 0.4:
        a, b = rng.sample(names, 2)
        links[(a, b)] = Link(rng.choice((0.5, 12.5)), rng.choice((0.02, 1.0)))
    return Fleet(devices=tuple(devices), node_links=links)


def _key(p: Problem) -> tuple[float, int, int] | None:
    found = exact_search(p)
    if found is None:
        return None
    stages, _m, step = found
    return step, len(stages), len({s.device.node for s in stages})


def test_pruned_optimum_equals_the_brute_force_optimum() -> None:
    """Over 40 random fleets, the exhaustive optimum (value, stages, nodes) over the kept
    nodes is the exhaustive optimum over all nodes, whichever valid plan sets the incumbent."""
    dropped = 0
    for seed in range(40):
        rng = random.Random(seed)
        problem = Problem(_profile(rng.choice((4, 5, 6))), _fleet(rng), 1024, rng.choice((1, 2, 4)))
        full = _key(problem)
        if full is None:
            continue
        t = Tables(problem)
        greedy = greedy_evaluation(problem, t)
        assert greedy is not None
        for incumbent in (full[0], greedy.step_ms):
            pruned = prune(problem, incumbent, t)
            assert pruned.problem.devices, seed
            assert _key(pruned.problem) == pytest.approx(full), (seed, incumbent)
            dropped += pruned.nodes_dropped
            kept = {d.node for d in pruned.problem.devices}
            for pair in problem.fleet.node_links:  # a node with a link of its own stays
                assert set(pair) <= kept, (seed, pair)
    assert dropped >= 20  # the fleets were built so that there is something to drop


def test_optimal_plans_use_no_more_nodes_than_the_budget() -> None:
    for seed in range(40):
        rng = random.Random(100 + seed)
        problem = Problem(_profile(rng.choice((4, 6))), _fleet(rng), 1024, rng.choice((1, 4)))
        found = exact_search(problem)
        if found is None:
            continue
        nodes = len({s.device.node for s in found[0]})
        assert nodes <= node_budget(problem, Tables(problem), found[2]), seed


def test_identical_nodes_beyond_the_budget_are_dropped_and_better_ones_kept() -> None:
    def node(name: str, bw: float, gib: int) -> list[Device]:
        return [
            Device(f"{name}/{i}", name, i, "g", bw, gib * GIB, gib * GIB, tflops=0.0)
            for i in range(2)
        ]

    devices = [d for k in range(6) for d in node(f"same{k}", 200.0, 3)]
    devices += node("better", 400.0, 3) + node("bigger", 100.0, 8)
    problem = Problem(_profile(4), Fleet(tuple(devices)), 1024, 1)
    t = Tables(problem)
    best = _key(problem)
    assert best is not None
    pruned = prune(problem, best[0], t)
    kept = {d.node for d in pruned.problem.devices}
    assert {"better", "bigger"} <= kept  # nothing covers them
    assert len(kept) <= pruned.node_budget + 2
    assert pruned.nodes_dropped >= 6 - pruned.node_budget
    assert _key(pruned.problem) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(3))
def test_cp_sat_finds_the_same_optimum_with_and_without_pruning(seed: int) -> None:
    """CP-SAT, run to a proof on the whole fleet and on the pruned one, at every M."""
    hosts = random_hosts(
        14, seed=seed, gpus=("A10", "A10", "L40S", "T4"), per_host=(2, 2), fast_links=0
    )
    devs, nodes = states(hosts)
    problem = Problem(resolve("llama-3.1-70b-q4"), build_fleet(devs, nodes), 4096, 1)
    t = Tables(problem)
    greedy = greedy_evaluation(problem, t)
    assert greedy is not None
    pruned = prune(problem, greedy.step_ms, t)
    assert pruned.nodes_dropped > 0

    def best(p: Problem) -> float:
        found = math.inf
        for m in p.all_m_choices():
            res = solve(p, m, hint=None, time_limit_s=60.0, tables=t)
            assert res.status in ("optimal", "infeasible"), (m, res.status)
            if res.plan is not None:
                found = min(found, evaluate(problem, res.plan, t, microbatches=m).step_ms)
        return found

    assert best(pruned.problem) == pytest.approx(best(problem), rel=1e-6)


def test_plan_at_fleet_scale_prunes_and_reports_its_gap() -> None:
    """A thousand-device fleet of repeated hosts: the service's path stays well inside a
    second and its answer carries a proven bound within 2 %."""
    import time

    hosts = random_hosts(
        1024,
        seed=7,
        gpus=("H100-SXM", "A100-80GB", "L40S", "RTX-4090"),
        per_host=(8, 8),
        fast_links=0,
    )
    devs, nodes = states(hosts)
    problem = Problem(resolve("llama-3.1-70b"), build_fleet(devs, nodes), 8192, 1)
    started = time.perf_counter()
    out = plan(problem)
    assert time.perf_counter() - started < 5.0  # generous: a loaded 2-core machine
    assert out.evaluation.ok
    assert out.gap_pct is not None and out.gap_pct <= 2.0
