"""placement-quality: how good are the planner's plans?

A suite of fleet x model cases (mixes of the known GPUs, 2-16 devices, 1-4 per host, models
from 8B to 405B, contexts 4k-128k). For each case the planner's bottleneck is compared with:

- the fluid lower bound (total bytes read per step / total bandwidth);
- the memory-proportional split (exo's ``allocate_layers_proportionally``, reproduced
  faithfully, given every device rather than one per host: the generous version of the
  baseline), judged by the same cost model and real memory (KV, embeddings, head);
- for cases of up to 6 devices, the exact optimum from an exhaustive search over device subsets,
  orders and splits under the same cost model, in the planner's plan space (each node's devices
  kept together, so the plan crosses each slow link once); the optimum over *every* order is
  shown beside it ("any order") so the price of that rule is visible.

The planner runs exactly as the service does (default time limit). Last line: JSON with
``cases``, ``max_gap_vs_exact_pct``, ``median_gain_vs_proportional_pct`` (heterogeneous cases
where the proportional plan fits), ``worse_than_proportional``, ``infeasible_where_plan_exists``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass

from shardplane.planner.catalog import resolve
from shardplane.planner.cost import Problem, evaluate, lower_bound_ms
from shardplane.planner.exact import exact_plan
from shardplane.planner.fleet import build_fleet
from shardplane.planner.greedy import proportional_plan
from shardplane.planner.plan import PlanError, plan
from shardplane.planner.synthetic import HostSpec, states

GPU_POOL = (
    "H100-SXM",
    "A100-80GB",
    "A100-40GB",
    "L40S",
    "A10",
    "RTX-4090",
    "RTX-3090",
    "RTX-3060-12GB",
    "T4",
    "V100-32GB",
    "P40",
    "MI250X",
    "MI300X",
)
MODELS = (
    "llama-3.1-8b",
    "qwen2.5-7b",
    "mistral-7b",
    "mixtral-8x7b",
    "qwen3-32b",
    "llama-3.1-70b",
    "qwen2.5-72b",
    "llama-3.1-70b-q4",
    "qwen2.5-72b-q8",
    "llama-3.1-405b-q4",
    "llama-3.1-405b",
)
CONTEXTS = (4096, 8192, 32768, 131072)
EXACT_MAX_DEVICES = 6


@dataclass
class Case:
    name: str
    problem: Problem
    hosts: list[HostSpec]


def _hosts(rng: random.Random, devices: int, idx: int) -> list[HostSpec]:
    kinds = rng.sample(GPU_POOL, rng.randint(2, 4))
    hosts: list[HostSpec] = []
    left = devices
    while left > 0:
        k = min(left, rng.randint(1, 4))
        gpu = rng.choice(kinds)
        hosts.append(
            HostSpec(
                f"c{idx}h{len(hosts)}",
                (gpu,) * k,
                nvlink=k > 1 and rng.random() < 0.5,
                used_gib=rng.choice((0.0, 0.5, 1.0, 3.0)),
            )
        )
        left -= k
    if len(hosts) > 2 and rng.random() < 0.5:  # a faster link between two hosts
        a, b = rng.sample(range(len(hosts)), 2)
        ha = hosts[a]
        hosts[a] = HostSpec(
            ha.name, ha.gpus, ha.nvlink, ha.used_gib, ha.util_pct, ((hosts[b].name, 100.0, 0.01),)
        )
    return hosts


def build_cases(count: int, seed: int = 2024) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    idx = 0
    while len(cases) < count:
        idx += 1
        # Half the suite is small enough for the exhaustive search.
        devices = rng.randint(2, EXACT_MAX_DEVICES) if len(cases) % 2 == 0 else rng.randint(7, 16)
        hosts = _hosts(rng, devices, idx)
        devs, nodes = states(hosts)
        fleet = build_fleet(devs, nodes)
        total = sum(d.usable_bytes(0.1) for d in fleet.devices)
        ctx = rng.choice(CONTEXTS)
        fitting = [m for m in MODELS if resolve(m).weight_bytes < 0.85 * total]
        if not fitting:
            continue
        model = rng.choice(fitting[-4:] if rng.random() < 0.6 else fitting)
        p = Problem(resolve(model), fleet, ctx, 1)
        gpus = "+".join(
            sorted(
                {
                    f"{h.gpus[0]}x{sum(len(x.gpus) for x in hosts if x.gpus[0] == h.gpus[0])}"
                    for h in hosts
                }
            )
        )
        cases.append(Case(f"{model}@{ctx // 1024}k on {gpus}", p, hosts))
    return cases


# Tight cases on purpose: the memory-proportional split ignores the KV cache, the embeddings and
# the head, so near the fleet's capacity it overflows a device while a plan still exists.
TIGHT: tuple[tuple[str, int, tuple[HostSpec, ...]], ...] = (
    ("llama-3.1-8b", 131072, (HostSpec("t1a", ("RTX-3060-12GB",)), HostSpec("t1b", ("RTX-4090",)))),
    (
        "llama-3.1-70b",
        4096,
        (HostSpec("t2a", ("A100-80GB",)), HostSpec("t2b", ("L40S",)), HostSpec("t2c", ("A10",))),
    ),
    ("qwen3-32b", 32768, (HostSpec("t3a", ("RTX-4090",) * 3), HostSpec("t3b", ("RTX-3060-12GB",)))),
    (
        "mixtral-8x7b",
        32768,
        (HostSpec("t4a", ("RTX-3060-12GB",)), HostSpec("t4b", ("L40S", "L40S"))),
    ),
    (
        "llama-3.1-70b-q8",
        131072,
        (HostSpec("t5a", ("A100-40GB",) * 2), HostSpec("t5b", ("P40", "P40"))),
    ),
    (
        "llama-3.1-70b-q4",
        65536,
        (HostSpec("t6a", ("RTX-3060-12GB",) * 2), HostSpec("t6b", ("L40S",))),
    ),
)


def tight_cases() -> list[Case]:
    out: list[Case] = []
    for model, ctx, hosts in TIGHT:
        devs, nodes = states(hosts)
        p = Problem(resolve(model), build_fleet(devs, nodes), ctx, 1)
        gpus = "+".join(g for h in hosts for g in h.gpus)
        out.append(Case(f"{model}@{ctx // 1024}k on {gpus} (tight)", p, list(hosts)))
    return out


def run_case(case: Case) -> dict[str, object]:
    p = case.problem
    row: dict[str, object] = {
        "case": case.name,
        "devices": len(p.devices),
        "hetero": len({d.signature(p.headroom) for d in p.devices}) > 1,
    }
    started = time.perf_counter()
    try:
        out = plan(p)
        ours: float | None = out.evaluation.bottleneck_ms
        row |= {"solver": out.solver, "status": out.status}
    except PlanError as exc:
        ours = None
        row |= {"solver": "-", "status": exc.code}
    row["solve_ms"] = (time.perf_counter() - started) * 1e3
    row["ours"] = ours
    row["fluid"] = lower_bound_ms(p)
    prop = proportional_plan(p)
    pe = evaluate(p, prop) if prop else None
    row["prop"] = pe.bottleneck_ms if pe is not None and pe.fits else None
    exact = None
    if len(p.devices) <= EXACT_MAX_DEVICES:
        xp = exact_plan(p)
        exact = evaluate(p, xp).bottleneck_ms if xp else None
        anyp = exact_plan(p, node_contiguous=False)
        row["any_order"] = evaluate(p, anyp).bottleneck_ms if anyp else None
    row["exact"] = exact
    return row


def _f(x: object, fmt: str = "{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, float) else ("-" if x is None else str(x))


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shardplane bench placement-quality")
    ap.add_argument(
        "--cases", type=int, default=None, help="number of cases (default 48, quick 30)"
    )
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument(
        "--quick", action="store_true", help=argparse.SUPPRESS
    )  # REMAINDER may carry it
    args = ap.parse_args(argv or [])
    quick = quick or args.quick
    count = args.cases or (30 if quick else 48)
    rows = [run_case(c) for c in [*tight_cases(), *build_cases(count - len(TIGHT), args.seed)]]

    gaps_exact: list[float] = []
    gains: list[float] = []
    worse = 0
    infeasible_where_plan_exists = 0
    prop_infeasible_we_fit = 0
    print(
        f"{'case':58} {'dev':>3} {'solver':>8} {'status':>8} {'ms':>7} {'ours':>8} {'fluid':>8} {'exo':>8} {'exact':>8} {'any ord':>8} {'vs exo':>7} {'vs exact':>8}"
    )
    for r in rows:
        ours, prop, exact = r["ours"], r["prop"], r["exact"]
        gain = gap = None
        if isinstance(ours, float) and isinstance(prop, float):
            gain = (prop - ours) / prop * 100.0
            if ours > prop * (1 + 1e-9):
                worse += 1
            if r["hetero"]:
                gains.append(gain)
        if isinstance(ours, float) and isinstance(exact, float):
            gap = (ours - exact) / exact * 100.0
            gaps_exact.append(gap)
        plan_exists = isinstance(exact, float) or isinstance(prop, float)
        if ours is None and plan_exists:
            infeasible_where_plan_exists += 1
        if isinstance(ours, float) and prop is None:
            prop_infeasible_we_fit += 1
        solver = str(r["solver"]).split(" ")[0]
        print(
            f"{str(r['case'])[:58]:58} {r['devices']:>3} {solver:>8} {str(r['status'])[:8]:>8} {_f(r['solve_ms'], '{:.0f}'):>7} "
            f"{_f(ours):>8} {_f(r['fluid']):>8} {_f(prop):>8} {_f(exact):>8} {_f(r.get('any_order')):>8} {_f(gain, '{:+.1f}%'):>7} {_f(gap, '{:+.2f}%'):>8}"
        )
    price = [
        (float(r["exact"]) / float(r["any_order"]) - 1) * 100  # pyright: ignore[reportArgumentType]
        for r in rows
        if isinstance(r.get("exact"), float) and isinstance(r.get("any_order"), float)
    ]
    solve = sorted(float(r["solve_ms"]) for r in rows)  # pyright: ignore[reportArgumentType]
    print()
    print(
        f"{len(rows)} cases; {len(gaps_exact)} checked against the exhaustive optimum; "
        f"exo's split does not fit in {sum(1 for r in rows if r['prop'] is None)} cases, we fit in {prop_infeasible_we_fit} of them"
    )
    print(
        f"median gain vs memory-proportional (heterogeneous, both fit): {statistics.median(gains) if gains else 0:.1f}% "
        f"over {len(gains)} cases; solve time p50 {statistics.median(solve):.0f} ms, max {max(solve):.0f} ms"
    )
    if price:
        print(
            f"keeping each node's devices together costs at most {max(price):.2f}% against the best "
            f"order of any kind ({sum(1 for x in price if x > 1e-6)} of {len(price)} small cases affected)"
        )
    print(
        json.dumps(
            {
                "cases": len(rows),
                "max_gap_vs_exact_pct": round(max(gaps_exact), 4) if gaps_exact else 0.0,
                "median_gain_vs_proportional_pct": round(statistics.median(gains), 2)
                if gains
                else 0.0,
                "worse_than_proportional": worse,
                "infeasible_where_plan_exists": infeasible_where_plan_exists,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
