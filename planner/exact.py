"""Exhaustive search: the exact optimum for small cases, to audit the solvers.

It shares nothing with the solvers it audits (no packer, no prefix tables, no bounds): every
ordered subset of devices (node-contiguous by default, like the planner's plans, or any order),
every vector of layer counts for it (each device at least one layer), and every M the request
allows, scored by the decode schedule of planner.schedule. The per-stage arithmetic is done for
all count vectors of one order at once with numpy, from the model profile directly; the winner
is re-scored through planner.schedule, and the two must agree.

Cost: sum over orders of C(L - 1, k - 1) count vectors for k devices, so it is meant for small
cases (``count_vectors`` says how many a problem has; the benchmark skips the large ones, and
fleets of more than 6 devices, whose orders alone are too many to list).
"""

from __future__ import annotations

import math
from itertools import combinations, pairwise, permutations

import numpy as np

from shardplane.planner import schedule
from shardplane.planner.cost import WORKSPACE_BYTES, Problem, StagePlan
from shardplane.planner.fleet import Device


def _orders(problem: Problem, node_contiguous: bool) -> list[tuple[Device, ...]]:
    """Ordered device subsets, less those that differ only by swapping identical devices of one
    node (they score the same)."""
    out: list[tuple[Device, ...]] = []
    seen: set[tuple[object, ...]] = set()
    for k in range(max(1, problem.stage_floor), problem.stage_limit + 1):
        for order in permutations(problem.devices, k):
            if node_contiguous and not _contiguous(order):
                continue
            sig = tuple((d.node, *d.signature(problem.headroom)) for d in order)
            if sig not in seen:
                seen.add(sig)
                out.append(order)
    return out


def _contiguous(order: tuple[Device, ...]) -> bool:
    seen: list[str] = []
    for d in order:
        if not seen or seen[-1] != d.node:
            if d.node in seen:
                return False
            seen.append(d.node)
    return True


def count_vectors(problem: Problem, node_contiguous: bool = True) -> int:
    """How many (order, count vector) pairs the search scores."""
    L = problem.layers
    return sum(math.comb(L - 1, len(o) - 1) for o in _orders(problem, node_contiguous))


def _compositions(L: int, k: int) -> np.ndarray:
    """Every vector of k positive layer counts summing to L, as the cumulative ends (N x k)."""
    if k == 1:
        return np.array([[L]], dtype=np.int64)
    cuts = np.array(list(combinations(range(1, L), k - 1)), dtype=np.int64).reshape(-1, k - 1)
    return np.concatenate([cuts, np.full((len(cuts), 1), L, dtype=np.int64)], axis=1)


class _Profile:
    """Per-layer prefix sums from the profile, for one micro-batch size (the search's own)."""

    def __init__(self, problem: Problem, micro: int) -> None:
        p = problem.profile
        ctx = problem.context_tokens
        reads = p.read_bytes(micro)
        flops = p.layer_flops_per_token(ctx)
        self.read = np.concatenate(
            [
                [0.0],
                np.cumsum(
                    [reads[i] + p.kv_bytes_per_token[i] * ctx * micro for i in range(p.layers)]
                ),
            ]
        )
        self.flops = np.concatenate([[0.0], np.cumsum([f * micro for f in flops])])
        self.memory = np.concatenate(
            [
                [0.0],
                np.cumsum(
                    [
                        p.layer_bytes[i] + p.kv_bytes_per_token[i] * ctx * problem.batch
                        for i in range(p.layers)
                    ]
                ),
            ]
        )
        self.head_read = float(p.head_bytes)
        self.head_flops = p.head_flops_per_token * micro
        self.act = p.activation_bytes_per_token * micro
        self.ids = schedule.TOKEN_ID_BYTES * micro


def _hops(problem: Problem, order: tuple[Device, ...], prof: _Profile) -> float:
    total = 0.0
    for a, b in pairwise(order):
        link = problem.fleet.link(a, b)
        total += schedule.link_ms(prof.act, link.gbytes_per_s, link.latency_ms)
    if len(order) > 1:
        link = problem.fleet.link(order[-1], order[0])
        total += schedule.link_ms(prof.ids, link.gbytes_per_s, link.latency_ms)
    return total


def _fits(problem: Problem, order: tuple[Device, ...], ends: np.ndarray) -> np.ndarray:
    """Which count vectors fit every device's memory (rows of ``ends``)."""
    p = problem.profile
    prof = _Profile(problem, problem.batch)
    k = len(order)
    starts = np.concatenate([np.zeros((len(ends), 1), dtype=np.int64), ends[:, :-1]], axis=1)
    held = prof.memory[ends] - prof.memory[starts] + WORKSPACE_BYTES
    held[:, 0] += p.embed_bytes
    held[:, k - 1] += p.head_bytes
    if k == 1:
        held[:, 0] -= p.tied_bytes
    usable = np.array([problem.usable(d) for d in order], dtype=np.float64)
    return np.all(held <= usable, axis=1)


def _best_for_order(
    problem: Problem, order: tuple[Device, ...], ends: np.ndarray
) -> tuple[float, int, np.ndarray] | None:
    """(P, M, ends row) of the best count vector for ``order`` over the M allowed, or None."""
    k = len(order)
    starts = np.concatenate([np.zeros((len(ends), 1), dtype=np.int64), ends[:, :-1]], axis=1)
    bw = np.array([d.bandwidth_gbps * 1e6 for d in order])
    fl = np.array([d.tflops * 1e9 for d in order])
    best: tuple[float, int, np.ndarray] | None = None
    for m in problem.m_choices(k):
        prof = _Profile(problem, schedule.microbatch_size(problem.batch, m))
        read = prof.read[ends] - prof.read[starts]
        work = prof.flops[ends] - prof.flops[starts]
        read[:, k - 1] += prof.head_read
        work[:, k - 1] += prof.head_flops
        t = read / bw
        t = np.where(fl > 0, np.maximum(t, work / np.where(fl > 0, fl, 1.0)), t)
        step = np.maximum(t.sum(axis=1) + _hops(problem, order, prof), m * t.max(axis=1))
        i = int(np.argmin(step))
        if best is None or step[i] < best[0] * (1 - 1e-12):
            best = (float(step[i]), m, ends[i])
    return best


def exact_search(
    problem: Problem, *, node_contiguous: bool = True
) -> tuple[tuple[StagePlan, ...], int, float] | None:
    """(stages, M, P) of the optimum over all device subsets, orders, count vectors and M, by
    (P, stages, nodes); None when nothing fits.

    ``node_contiguous`` keeps each node's devices together, the planner's own plan space; False
    searches every order.
    """
    best: tuple[tuple[float, int, int], tuple[StagePlan, ...], int] | None = None
    for order in _orders(problem, node_contiguous):
        ends = _compositions(problem.layers, len(order))
        ends = ends[_fits(problem, order, ends)]
        if not len(ends):
            continue
        found = _best_for_order(problem, order, ends)
        if found is None:
            continue
        step, m, row = found
        key = (step, len(order), len({d.node for d in order}))
        if (
            best is None
            or key[0] < best[0][0] * (1 - 1e-12)
            or (key[0] <= best[0][0] * (1 + 1e-12) and key[1:] < best[0][1:])
        ):
            starts = [0, *row[:-1].tolist()]
            stages = tuple(
                StagePlan(d, int(a), int(e))
                for d, a, e in zip(order, starts, row.tolist(), strict=True)
            )
            best = (key, stages, m)
    if best is None:
        return None
    key, stages, m = best
    return stages, m, _rescore(problem, stages, m, key[0])


def _rescore(problem: Problem, stages: tuple[StagePlan, ...], m: int, step: float) -> float:
    """The winner's P through planner.schedule, which must agree with the vectorised figure."""
    prof = _Profile(problem, schedule.microbatch_size(problem.batch, m))
    times: list[float] = []
    for s in stages:
        read = float(prof.read[s.layer_end] - prof.read[s.layer_start])
        work = float(prof.flops[s.layer_end] - prof.flops[s.layer_start])
        if s.layer_end == problem.layers:
            read += prof.head_read
            work += prof.head_flops
        times.append(schedule.stage_ms(read, work, s.device.bandwidth_gbps, s.device.tflops))
    order = tuple(s.device for s in stages)
    hops = [_hops(problem, order, prof)]
    value = schedule.step_ms(times, hops, m)
    if not math.isclose(value, step, rel_tol=1e-9):
        raise AssertionError(f"exact search: vectorised P {step} but schedule gives {value}")
    return value


def exact_plan(problem: Problem, *, node_contiguous: bool = True) -> tuple[StagePlan, ...] | None:
    """The optimal stages (see :func:`exact_search`)."""
    found = exact_search(problem, node_contiguous=node_contiguous)
    return found[0] if found else None
