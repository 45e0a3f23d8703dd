"""Dropping whole nodes that can never be needed, before the solver sees the fleet.

Why: at 1,000+ nodes CP-SAT cannot even build its model in a request's time, but most of those
nodes are copies of, or worse than, nodes that are there anyway. This module removes them
without changing the optimum, so the solver works on the few that matter and its proof (or
its gap) still speaks for the whole fleet.

The rule, and why it is safe
----------------------------
Node ``N'`` *covers* node ``N`` when, pairing the i-th device of ``N`` with the i-th of ``N'``
(both sorted the same way), every device of ``N'`` has at least the usable memory, bandwidth
and TFLOPS of its partner (TFLOPS 0 means "unknown: no compute term", i.e. never slower) and
``N'`` has at least as many devices; ``N'``'s worst link between two of its own devices is at
least as good (bandwidth >=, latency <=) as ``N``'s best one; ``N`` has no link of its own to
another node (every hop from it is the fleet's default link) and every link ``N'`` has is at
least as good as the default. ``N' > N`` (``N'`` dominates ``N``) when ``N'`` covers ``N`` and
either ``N`` does not cover ``N'`` or the two cover each other and ``N'`` comes first in the
fleet; ``>`` is a strict partial order.

Exchange: take any plan that uses ``N`` but not ``N' > N``. Move each stage on a device of
``N`` to its partner in ``N'`` (same layers, same positions in the pipeline). Every stage still
fits, no stage gets slower, no hop gets slower (inside the node by the link condition, to and
from other nodes because ``N`` only had default links and ``N'`` has none worse), and the
stage and node counts are unchanged. So the new plan is no worse by the planner's whole key
(step time, then stages, then nodes).

Node budget ``K``: a plan with ``n`` nodes at ``M`` micro-batches has a step time of at least
``T(M) + (n - 1) x c(M)``: its stage times add up to at least the whole model's bytes over the
fastest device's bandwidth (``T``), and it has ``n - 1`` forward hops between nodes, each at
least the cheapest link between two nodes (``c``). An optimal plan is no slower than the
incumbent ``P`` (any valid plan, e.g. the greedy one), so it uses at most
``K = 1 + max over M of (P - T(M)) / c(M)`` nodes (and at most the stage limit).

A node ``N`` with at least ``K`` dominators is dropped. Take an optimal plan; while it uses a
node with an unused dominator, exchange the two (each exchange moves the plan strictly up the
order, so this ends). At the end it still is optimal and uses at most ``K`` nodes; a dropped
node in it would have ``K`` dominators of which at most ``K - 1`` are used, one free: a
contradiction. So some optimal plan uses only kept nodes, and the optimum over the kept nodes
equals the optimum over all of them (and so does any proven bound).

Cost: nodes are compared as rows of numbers (numpy), each against a pool of the strongest
``POOL`` nodes only; counting fewer dominators than exist only keeps more nodes, which is safe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from shardplane.planner import schedule
from shardplane.planner.cost import Problem, Tables
from shardplane.planner.fleet import Device, Fleet, Link

POOL = 256  # candidate dominators per node: the strongest by total bandwidth and memory
BLOCK = 128  # nodes compared against the pool at once (bounds the temporary arrays)
SLACK = 1e-9  # relative tolerance on the incumbent: float sums of equal plans may differ

Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Pruned:
    """The problem over the kept nodes, and what was dropped."""

    problem: Problem
    node_budget: int  # K: no optimal plan uses more nodes than this
    nodes_kept: int
    nodes_dropped: int
    devices_dropped: int


def _better(a: Link, b: Link) -> bool:
    return a.gbytes_per_s >= b.gbytes_per_s and a.latency_ms <= b.latency_ms


def node_budget(problem: Problem, tables: Tables, incumbent_ms: float) -> int:
    """K: the most nodes a plan no slower than ``incumbent_ms`` can use (see the module)."""
    fleet = problem.fleet
    nodes = len(fleet.nodes)
    limit = min(nodes, problem.stage_limit)
    if nodes <= 1 or not math.isfinite(incumbent_ms):
        return limit
    links = [fleet.default_link, *fleet.node_links.values()]
    fastest = max(d.bandwidth_gbps for d in problem.devices)
    most = 1
    for m in problem.all_m_choices():
        t = tables.for_m(m)
        floor_ms = t.read(0, t.L) / (fastest * 1e6)
        hop = min(schedule.link_ms(t.hop_bytes, k.gbytes_per_s, k.latency_ms) for k in links)
        if hop <= 0:
            return limit
        spare = incumbent_ms * (1 + SLACK) - floor_ms
        most = max(most, 1 + math.floor(max(0.0, spare) / hop))
    return min(limit, most)


def _intra(fleet: Fleet, devs: list[Device]) -> tuple[Link, Link] | None:
    """(worst, best) link between two devices of one node; None for a single device."""
    if len(devs) < 2:
        return None
    if not any(d.nvlink_peers for d in devs):  # no NVLink: every pair goes through the host
        one = fleet.link(devs[0], devs[1])
        return one, one
    links = {fleet.link(a, b) for a in devs for b in devs if a is not b}
    worst = Link(min(k.gbytes_per_s for k in links), max(k.latency_ms for k in links))
    best = Link(max(k.gbytes_per_s for k in links), min(k.latency_ms for k in links))
    return worst, best


def _rows(problem: Problem, by_node: dict[str, list[Device]]) -> tuple[Matrix, Matrix]:
    """Per node, a row as a dominator (``cover``) and a row as the dominated (``need``):
    ``N'`` covers ``N`` exactly when ``cover[N'] >= need[N]`` in every column."""
    fleet = problem.fleet
    width = max(len(v) for v in by_node.values())
    default = fleet.default_link
    own_links: dict[str, list[Link]] = {}
    for (a, b), link in fleet.node_links.items():
        own_links.setdefault(a, []).append(link)
        own_links.setdefault(b, []).append(link)
    cover = np.full((len(by_node), 3 * width + 3), -np.inf)
    need = np.full((len(by_node), 3 * width + 3), -np.inf)
    for i, (name, devs) in enumerate(by_node.items()):
        attrs = sorted(
            ((problem.usable(d), d.bandwidth_gbps, d.tflops or math.inf) for d in devs),
            reverse=True,
        )
        flat = [x for a in attrs for x in a]
        cover[i, : len(flat)] = flat
        need[i, : len(flat)] = flat
        intra = _intra(fleet, devs)
        if intra is not None:  # worst own link must beat the other's best (lower latency: -)
            worst, best = intra
            cover[i, -3:-1] = (worst.gbytes_per_s, -worst.latency_ms)
            need[i, -3:-1] = (best.gbytes_per_s, -best.latency_ms)
        links = own_links.get(name, [])
        cover[i, -1] = 0.0 if all(_better(k, default) for k in links) else -1.0
        need[i, -1] = 0.0 if not links else math.inf
    return cover, need


def _dominators(cover: Matrix, need: Matrix, enough: int) -> npt.NDArray[np.int64]:
    """How many pool nodes dominate each node (counting stops mattering at ``enough``)."""
    count = len(cover)
    finite = np.where(np.isfinite(cover), cover, 0.0)
    strength = finite[:, 0:-3:3].sum(axis=1) / 1e9 + finite[:, 1:-3:3].sum(axis=1)
    pool = np.argsort(-strength, kind="stable")[:POOL]
    out = np.zeros(count, dtype=np.int64)
    pool_cover, pool_need = cover[pool][None, :, :], need[pool][None, :, :]
    for lo in range(0, count, BLOCK):
        idx = np.arange(lo, min(count, lo + BLOCK))
        covers = np.all(pool_cover >= need[idx][:, None, :], axis=2)
        covered = np.all(cover[idx][:, None, :] >= pool_need, axis=2)
        earlier = pool[None, :] < idx[:, None]
        strict = covers & (~covered | earlier) & (pool[None, :] != idx[:, None])
        out[idx] = strict.sum(axis=1)
    return np.minimum(out, enough)


def prune(
    problem: Problem,
    incumbent_ms: float,
    tables: Tables | None = None,
    keep: Iterable[str] = (),
) -> Pruned:
    """``problem`` without the nodes that cannot help any plan as good as ``incumbent_ms``
    (the step time of a valid plan of this problem); the optimum is unchanged. Nodes in
    ``keep`` stay whatever their rank (keeping more is always safe: the solver's hint plans
    stay valid)."""
    t = tables or Tables(problem)
    by_node: dict[str, list[Device]] = {}
    for d in problem.devices:
        by_node.setdefault(d.node, []).append(d)
    budget = node_budget(problem, t, incumbent_ms)
    if len(by_node) <= budget:
        return Pruned(problem, budget, len(by_node), 0, 0)
    cover, need = _rows(problem, by_node)
    dropped = _dominators(cover, need, budget) >= budget
    names = list(by_node)
    gone = {names[i] for i in np.flatnonzero(dropped)} - set(keep)
    if not gone:
        return Pruned(problem, budget, len(by_node), 0, 0)
    kept = tuple(d for d in problem.devices if d.node not in gone)
    fleet = replace(problem.fleet, devices=kept)
    return Pruned(
        replace(problem, fleet=fleet),
        budget,
        len(by_node) - len(gone),
        len(gone),
        len(problem.devices) - len(kept),
    )
