"""CP-SAT placement: which devices take part, their pipeline order, their layer counts and M.

One model per number of micro-batches M (micro-batches of b = ceil(B / M) sequences); the
caller skips every M whose lower bound cannot beat the best plan found so far, so a proof of
``optimal`` covers every M the request allows. Each model is a ``_Model`` holding its variables,
built one concern at a time, so each constraint can be found by name:

- ``_layer_ranges``: per candidate device ``d``, used ``u[d]`` and an optional interval
  ``[s[d], e[d])`` of ``n[d]`` layers; the intervals do not overlap and sum to L, so the used
  devices tile ``[0, L)`` and the pipeline order *is* the order of the starts. ``first``/``last``
  mark the stages holding layer 0 and layer L - 1. M <= stages (and ``min_stages``,
  ``max_stages``) bound the stage count.
- ``_stage_costs``: memory (weights, KV for the whole batch, workspace, embeddings on the first
  stage, head on the last) within usable memory; stage time t[d] (100 ns units) at least its
  bytes over bandwidth and its FLOPs over TFLOPS. Prefix tables with AddElement for layers of
  unequal size; uniform layers use ``n x per-layer`` instead.
- ``_node_blocks``: each node's devices sit inside one interval of the node's total length,
  node intervals do not overlap, so a node's devices are contiguous in the pipeline;
  ``st[k]``/``en[k]`` mark the nodes holding the first and last stage.
- ``_hops``: a stage's hop to the next one: the intra-node link for all but a node's last
  device, the link to the next node for the node's last device (AddCircuit over nodes picks the
  next node when links differ), none for the final stage; and ``ret``, the return hop of the
  token ids from the last stage's node to the first's (0 on a single stage).
- ``_symmetry``: identical devices of one node are used in index order; identical nodes (when
  all links between nodes are the same) likewise.
- ``_objective``: ``P >= sum t + sum hop + ret`` and ``P >= M x t[d]``; minimise P, then fewer
  stages, then fewer nodes (lexicographic, folded into one objective).
- ``_residency`` and ``_fewest_moves`` (phase 2 of a re-placement, ``solve_moves``): ``keep[d]``
  when device ``d`` holds exactly the layer range it held before, and the weight bytes the plan
  loads, ``moved``; with ``P`` bounded by ``(1 + slack)`` x phase 1's step time in this model's
  own arithmetic, minimise ``moved``, then ``P``. Only an identical range counts as kept: that is
  what a worker adopts without reading anything (``agents.reconcile.same_weights``); a range
  that merely overlaps the old one is reloaded in full, so counting the overlap as free would
  minimise a figure the fleet does not pay.

Integer rounding: memory in bytes (a plan the model accepts really fits); reads in KiB and work
in kFLOP, rounded up, and device speeds rounded down; times round up to 100 ns. The caller
re-evaluates the plan in floating point and keeps the better of it and the greedy hint.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from shardplane.bus.messages import Stage
from shardplane.planner.cost import WORKSPACE_BYTES, Problem, StagePlan, Tables
from shardplane.planner.fleet import Device

KIB = 1024
KFLOP = 1000
TIME_UNITS_PER_MS = 10_000  # 100 ns
CIRCUIT_MAX_NODES = 40  # beyond this the next-node choice is approximated by the cheapest link
BIG = 10**12
# CP-SAT's linearization level. The step time is a sum over stages, which propagation alone
# bounds poorly: measured on 24 random fleets (4-16 devices, batch 1/8/64), level 1 proved 9
# plans optimal in the default budget against 4 at level 0 (the old bottleneck objective's
# choice) and 7 at level 2, with the lowest median latency; on the demo fleet's 70B at batch 1
# the proof takes 0.02 s instead of 6 s.
LINEARIZATION = 1


@dataclass(frozen=True, slots=True)
class SolveResult:
    plan: tuple[StagePlan, ...] | None
    microbatches: int
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    gap_pct: float | None = None
    wall_ms: float = 0.0
    bound_ms: float | None = None  # the solver's proven bound on P at this M, ms
    limit_units: int | None = None  # phase 2 only: the bound it put on P (100 ns units)


def _up(x: float, unit: int) -> int:
    return math.ceil(x / unit - 1e-9)


def _units(ms: float) -> int:
    return math.ceil(ms * TIME_UNITS_PER_MS - 1e-9)


@dataclass
class _Model:
    """One CP-SAT model (fixed M) and every variable it has, by concern."""

    problem: Problem
    t: Tables  # prefix tables for micro-batches of this M
    devs: list[Device]
    m_count: int
    model: cp_model.CpModel = field(default_factory=cp_model.CpModel)
    exact: bool = True  # False where a hop is approximated (the proof then does not hold)
    # layer ranges
    u: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    n: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    s: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    e: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    first: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    last: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    multi: cp_model.IntVar | None = None  # two or more stages
    # stage costs
    time: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    read_prefix: list[int] = field(default_factory=list[int])  # KiB
    flops_prefix: list[int] = field(default_factory=list[int])  # kFLOP
    head_read: int = 0
    head_flops: int = 0
    # node blocks
    names: list[str] = field(default_factory=list[str])
    members: dict[str, list[int]] = field(default_factory=dict[str, list[int]])
    used_k: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    ns: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    ne: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    lastn: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    st: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    en: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    # hops
    hop: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    node_hop: list[list[int]] = field(default_factory=list[list[int]])
    arcs: dict[tuple[int, int], cp_model.IntVar] = field(
        default_factory=dict[tuple[int, int], cp_model.IntVar]
    )
    uniform_cross: bool = True
    ret: cp_model.IntVar | None = None
    same_ends: cp_model.IntVar | None = None  # first and last stage on one node (uniform links)
    ends_at: list[cp_model.IntVar] = field(default_factory=list[cp_model.IntVar])
    both: dict[int, cp_model.IntVar] = field(default_factory=dict[int, cp_model.IntVar])
    lower_units: int = 0
    # objective
    step: cp_model.IntVar | None = None
    tie_span: int = 1
    # residency (phase 2): device -> (start, end, weight bytes) of the range it holds now
    resident: dict[int, tuple[int, int, int]] = field(
        default_factory=dict[int, tuple[int, int, int]]
    )
    keep: dict[int, cp_model.IntVar] = field(default_factory=dict[int, cp_model.IntVar])
    moved: cp_model.LinearExpr | None = None  # KiB of weights the plan loads

    @property
    def D(self) -> int:
        return len(self.devs)

    @property
    def L(self) -> int:
        return self.t.L

    def hop_units(self, i: int, j: int) -> int:
        return _units(self.t.hop(self.devs[i], self.devs[j]))

    def return_units(self, i: int, j: int) -> int:
        return _units(self.t.return_hop(self.devs[i], self.devs[j]))

    def node_of(self, d: int) -> int:
        return self.names.index(self.devs[d].node)


def _layer_ranges(mdl: _Model) -> None:
    m, L, D, p = mdl.model, mdl.L, mdl.D, mdl.problem
    mdl.u = [m.new_bool_var(f"u{d}") for d in range(D)]
    mdl.n = [m.new_int_var(0, L, f"n{d}") for d in range(D)]
    mdl.s = [m.new_int_var(0, L, f"s{d}") for d in range(D)]
    mdl.e = [m.new_int_var(0, L, f"e{d}") for d in range(D)]
    iv = [
        m.new_optional_interval_var(mdl.s[d], mdl.n[d], mdl.e[d], mdl.u[d], f"iv{d}")
        for d in range(D)
    ]
    m.add_no_overlap(iv)
    m.add(sum(mdl.n) == L)
    mdl.first = [m.new_bool_var(f"first{d}") for d in range(D)]
    mdl.last = [m.new_bool_var(f"last{d}") for d in range(D)]
    for d in range(D):
        u, first, last = mdl.u[d], mdl.first[d], mdl.last[d]
        m.add(mdl.n[d] >= 1).only_enforce_if(u)
        m.add(mdl.n[d] == 0).only_enforce_if(~u)
        m.add(mdl.s[d] == 0).only_enforce_if(~u)
        m.add_implication(first, u)
        m.add_implication(last, u)
        m.add(mdl.s[d] == 0).only_enforce_if(first)
        m.add(mdl.s[d] >= 1).only_enforce_if(u, ~first)
        m.add(mdl.e[d] == L).only_enforce_if(last)
        m.add(mdl.e[d] <= L - 1).only_enforce_if(u, ~last)
    m.add(sum(mdl.first) == 1)
    m.add(sum(mdl.last) == 1)
    m.add(sum(mdl.u) <= p.stage_limit)
    m.add(sum(mdl.u) >= max(mdl.m_count, p.stage_floor))
    mdl.multi = m.new_bool_var("multi")
    m.add(sum(mdl.u) >= 2).only_enforce_if(mdl.multi)
    m.add(sum(mdl.u) <= 1).only_enforce_if(~mdl.multi)


def _stage_costs(mdl: _Model) -> None:
    m, t, L, p = mdl.model, mdl.t, mdl.L, mdl.problem
    uniform = t.uniform
    mem_prefix = [t.W[i] + t.K[i] for i in range(L + 1)]
    if uniform:  # exact multiples of one rounded-up layer: linear, no element constraints
        mdl.read_prefix = [_up(t.layer_read, KIB) * i for i in range(L + 1)]
        mdl.flops_prefix = [_up(t.layer_flops, KFLOP) * i for i in range(L + 1)]
    else:
        mdl.read_prefix = [_up(t.R[i], KIB) for i in range(L + 1)]
        mdl.flops_prefix = [_up(t.F[i], KFLOP) for i in range(L + 1)]
    mdl.head_read = _up(t.head, KIB)
    mdl.head_flops = _up(t.head_flops, KFLOP)
    mdl.time = [m.new_int_var(0, BIG, f"t{d}") for d in range(mdl.D)]
    for d, dev in enumerate(mdl.devs):
        parts: list[cp_model.LinearExpr] = []
        for name, prefix in (
            ("mem", mem_prefix),
            ("read", mdl.read_prefix),
            ("flops", mdl.flops_prefix),
        ):
            if uniform:
                parts.append(mdl.n[d] * prefix[1])
                continue
            top = prefix[L]
            a, b = m.new_int_var(0, top, f"{name}s{d}"), m.new_int_var(0, top, f"{name}e{d}")
            m.add_element(mdl.s[d], prefix, a)
            m.add_element(mdl.e[d], prefix, b)
            parts.append(b - a)
        mem_layers, read_layers, flops_layers = parts
        ends = t.embed * mdl.first[d] + t.head * mdl.last[d]
        if t.tied:  # a single stage holds a tied embedding/head matrix once (Tables.weights)
            both = m.new_bool_var(f"both{d}")
            mdl.both[d] = both
            m.add_implication(both, mdl.first[d])
            m.add_implication(both, mdl.last[d])
            ends -= t.tied * both
        m.add(mem_layers + ends + WORKSPACE_BYTES * mdl.u[d] <= p.usable(dev))
        # t (100 ns) >= KiB x 1024 / (GB/s x 1e9) x 1e7 = KiB x 1024 / (GB/s x 100)
        bw = max(1, math.floor(dev.bandwidth_gbps * 100))
        m.add(bw * mdl.time[d] >= KIB * (read_layers + mdl.head_read * mdl.last[d]))
        if dev.tflops > 0:
            # t (100 ns) >= kFLOP x 1e3 / (TFLOPS x 1e12) x 1e7 = kFLOP / (TFLOPS x 100)
            fl = max(1, math.floor(dev.tflops * 100))
            m.add(fl * mdl.time[d] >= flops_layers + mdl.head_flops * mdl.last[d])


def _node_blocks(mdl: _Model) -> None:
    m, L = mdl.model, mdl.L
    for d, dev in enumerate(mdl.devs):
        mdl.members.setdefault(dev.node, []).append(d)
    mdl.names = list(mdl.members)
    mdl.lastn = [m.new_bool_var(f"lastn{d}") for d in range(mdl.D)]
    node_iv: list[cp_model.IntervalVar] = []
    for k, name in enumerate(mdl.names):
        members = mdl.members[name]
        uk = m.new_bool_var(f"used_{k}")
        m.add_max_equality(uk, [mdl.u[d] for d in members])
        size = m.new_int_var(0, L, f"size_{k}")
        m.add(size == sum(mdl.n[d] for d in members))
        a, b = m.new_int_var(0, L, f"ns_{k}"), m.new_int_var(0, L, f"ne_{k}")
        node_iv.append(m.new_optional_interval_var(a, size, b, uk, f"niv_{k}"))
        m.add(a == 0).only_enforce_if(~uk)
        for d in members:
            m.add(mdl.s[d] >= a).only_enforce_if(mdl.u[d])
            m.add(mdl.e[d] <= b).only_enforce_if(mdl.u[d])
            m.add_implication(mdl.lastn[d], mdl.u[d])
            m.add(mdl.e[d] == b).only_enforce_if(mdl.lastn[d])
            m.add(mdl.e[d] <= b - 1).only_enforce_if(mdl.u[d], ~mdl.lastn[d])
        mdl.used_k.append(uk)
        mdl.ns.append(a)
        mdl.ne.append(b)
        st, en = m.new_bool_var(f"st_{k}"), m.new_bool_var(f"en_{k}")
        m.add(st == sum(mdl.first[d] for d in members))
        m.add(en == sum(mdl.last[d] for d in members))
        mdl.st.append(st)
        mdl.en.append(en)
    m.add_no_overlap(node_iv)


def _hops(mdl: _Model) -> None:
    """Forward hops, then the return hop."""
    m, K = mdl.model, len(mdl.names)
    rep = [mdl.members[name][0] for name in mdl.names]
    mdl.node_hop = [
        [mdl.hop_units(rep[k], rep[j]) if k != j else 0 for j in range(K)] for k in range(K)
    ]
    cross = {mdl.node_hop[k][j] for k in range(K) for j in range(K) if k != j}
    mdl.uniform_cross = len(cross) <= 1
    out_hop: list[cp_model.LinearExprT]
    if mdl.uniform_cross:
        out_hop = [next(iter(cross), 0)] * K
    elif K <= CIRCUIT_MAX_NODES:
        out_hop = _circuit(mdl)
    else:
        mdl.exact = False
        out_hop = [min(mdl.node_hop[k][j] for j in range(K) if j != k) for k in range(K)]
    mdl.hop = [m.new_int_var(0, BIG, f"hop{d}") for d in range(mdl.D)]
    for k, name in enumerate(mdl.names):
        for d in mdl.members[name]:
            others = [mdl.hop_units(d, o) for o in mdl.members[name] if o != d]
            if len(set(others)) > 1:
                mdl.exact = False  # mixed NVLink/PCIe inside a node: charged the cheapest
            if others:
                m.add(mdl.hop[d] >= min(others)).only_enforce_if(mdl.u[d], ~mdl.lastn[d])
            m.add(mdl.hop[d] >= out_hop[k]).only_enforce_if(mdl.lastn[d], ~mdl.last[d])
    _return_hop(mdl, rep)


def _circuit(mdl: _Model) -> list[cp_model.LinearExprT]:
    """The order of the nodes as a circuit through a depot; each node's outgoing hop."""
    m, K, L = mdl.model, len(mdl.names), mdl.L
    arcs: list[tuple[int, int, cp_model.LiteralT]] = []
    depot = K
    outs: list[list[tuple[cp_model.IntVar, int]]] = [[] for _ in range(K)]
    for k in range(K):
        arcs.append((k, k, ~mdl.used_k[k]))
        st = m.new_bool_var(f"start_{k}")
        en = m.new_bool_var(f"end_{k}")
        mdl.arcs[(depot, k)] = st
        mdl.arcs[(k, depot)] = en
        arcs += [(depot, k, st), (k, depot, en)]
        m.add(mdl.ns[k] == 0).only_enforce_if(st)
        m.add(mdl.ne[k] == L).only_enforce_if(en)
        for j in range(K):
            if j != k:
                lit = m.new_bool_var(f"arc_{k}_{j}")
                mdl.arcs[(k, j)] = lit
                arcs.append((k, j, lit))
                m.add(mdl.ne[k] == mdl.ns[j]).only_enforce_if(lit)
                outs[k].append((lit, mdl.node_hop[k][j]))
    m.add_circuit(arcs)
    return [sum(c * lit for lit, c in outs[k]) for k in range(K)]


def _return_hop(mdl: _Model, rep: list[int]) -> None:
    """ret: the last stage's node to the first stage's node; within one node the cheapest pair
    of its devices (exact when they are all alike); 0 on a single stage."""
    m, K = mdl.model, len(mdl.names)
    assert mdl.multi is not None
    mdl.ret = m.new_int_var(0, BIG, "ret")
    cross = {mdl.return_units(rep[k], rep[j]) for k in range(K) for j in range(K) if k != j}
    if len(cross) == 1:  # one value between any two nodes: pay it unless both ends share a node
        c = next(iter(cross))
        same = m.new_bool_var("same_node_ends")
        z = [m.new_bool_var(f"ends_{k}") for k in range(K)]
        mdl.same_ends, mdl.ends_at = same, z
        for k in range(K):
            m.add(z[k] <= mdl.st[k])
            m.add(z[k] <= mdl.en[k])
        m.add(same <= sum(z))
        m.add(mdl.ret >= c * (mdl.multi - same))
    elif K <= CIRCUIT_MAX_NODES:
        for k in range(K):
            for j in range(K):
                if k != j:
                    c = mdl.return_units(rep[k], rep[j])
                    m.add(mdl.ret >= c * (mdl.en[k] + mdl.st[j] - 1))
    elif cross:
        mdl.exact = False
        m.add(mdl.ret >= min(cross) * mdl.multi)
    for k, name in enumerate(mdl.names):
        pairs = [
            mdl.return_units(a, b) for a in mdl.members[name] for b in mdl.members[name] if a != b
        ]
        if pairs:
            if len(set(pairs)) > 1:
                mdl.exact = False
            m.add(mdl.ret >= min(pairs) * (mdl.en[k] + mdl.st[k] + mdl.multi - 2))


def _symmetry(mdl: _Model) -> None:
    m, p = mdl.model, mdl.problem
    for name in mdl.names:
        members = mdl.members[name]
        for a_, b_ in itertools.pairwise(members):
            if a_ in mdl.resident or b_ in mdl.resident:
                continue  # what a device holds tells it apart from its twin
            da, db = mdl.devs[a_], mdl.devs[b_]
            if da.signature(p.headroom) == db.signature(p.headroom) and _same_links(
                p, da, db, [mdl.devs[x] for x in members]
            ):
                m.add_implication(mdl.u[b_], mdl.u[a_])
                m.add(mdl.s[a_] < mdl.s[b_]).only_enforce_if(mdl.u[b_])
    if not mdl.uniform_cross:
        return
    prev: dict[tuple[object, ...], int] = {}
    for k, name in enumerate(mdl.names):
        if any(d in mdl.resident for d in mdl.members[name]):
            continue
        devs = [mdl.devs[d] for d in mdl.members[name]]
        key = (*sorted(d.signature(p.headroom) for d in devs), len(devs))
        if key in prev:
            j = prev[key]
            if _node_intra_same(p, [mdl.devs[d] for d in mdl.members[mdl.names[j]]], devs):
                m.add_implication(mdl.used_k[k], mdl.used_k[j])
                m.add(mdl.ns[j] < mdl.ns[k]).only_enforce_if(mdl.used_k[k])
        prev[key] = k


def _objective(mdl: _Model, lower_bound_ms: float) -> None:
    m = mdl.model
    assert mdl.ret is not None
    mdl.step = m.new_int_var(0, BIG, "P")
    m.add(mdl.step >= sum(mdl.time) + sum(mdl.hop) + mdl.ret)
    for d in range(mdl.D):
        m.add(mdl.step >= mdl.m_count * mdl.time[d])
    # A proven bound on P (planner.bounds) spares the search most of its proof.
    mdl.lower_units = math.floor(lower_bound_ms * TIME_UNITS_PER_MS * (1 - 1e-9))
    m.add(mdl.step >= mdl.lower_units)
    mdl.tie_span = mdl.D + len(mdl.names) + 1
    m.minimize(mdl.step * mdl.tie_span + sum(mdl.u) + sum(mdl.used_k))


def _residency(mdl: _Model) -> None:
    """``keep[d]``: device d holds exactly its old range again; ``moved``: the KiB of weights
    the plan loads, every stage's weights (each layer once, the embeddings and head once, a
    tied matrix once on a single stage) less those kept."""
    m, t = mdl.model, mdl.t
    assert mdl.multi is not None
    weights: list[int] = []
    for d, (a, b, weight) in mdl.resident.items():
        keep = m.new_bool_var(f"keep{d}")
        m.add_implication(keep, mdl.u[d])
        m.add(mdl.s[d] == a).only_enforce_if(keep)
        m.add(mdl.e[d] == b).only_enforce_if(keep)
        mdl.keep[d] = keep
        weights.append(weight // KIB)
    kept = cp_model.LinearExpr.weighted_sum(list(mdl.keep.values()), weights)
    total = _up(t.W[mdl.L] + t.embed + t.head, KIB) - t.tied // KIB
    mdl.moved = total + t.tied // KIB * mdl.multi - kept


def _fewest_moves(mdl: _Model, limit_units: int) -> None:
    """Phase 2's objective: P within ``limit_units``; the fewest KiB loaded, then the least P
    (exactly lexicographic: P never exceeds the factor)."""
    assert mdl.step is not None and mdl.moved is not None
    mdl.model.add(mdl.step <= limit_units)
    mdl.model.minimize(mdl.moved * (limit_units + 1) + mdl.step)


def build(
    problem: Problem,
    t: Tables,
    devs: list[Device],
    m_count: int,
    lower_bound_ms: float,
    resident: dict[int, tuple[int, int, int]] | None = None,
) -> _Model:
    """The model for M = ``m_count``, concern by concern; ``resident`` (device index -> the
    range it holds and its weight bytes; empty when none survives) adds phase 2's residency."""
    mdl = _Model(problem, t.for_m(m_count), devs, m_count, resident=resident or {})
    phase2 = resident is not None
    _layer_ranges(mdl)
    _stage_costs(mdl)
    _node_blocks(mdl)
    _hops(mdl)
    _symmetry(mdl)
    _objective(mdl, lower_bound_ms)
    if phase2:
        _residency(mdl)
    return mdl


def solve(
    problem: Problem,
    m_count: int,
    *,
    hint: tuple[StagePlan, ...] | None,
    time_limit_s: float,
    workers: int = 1,
    lower_bound_ms: float = 0.0,
    tables: Tables | None = None,
) -> SolveResult:
    """CP-SAT's best plan at M = ``m_count`` within ``time_limit_s`` (model building included)."""
    started = time.perf_counter()
    t = tables or Tables(problem)
    devs = _candidates(problem, t)
    if not devs:
        return SolveResult(
            None, m_count, "infeasible", wall_ms=(time.perf_counter() - started) * 1e3
        )
    mdl = build(problem, t, devs, m_count, lower_bound_ms)
    if hint and len(hint) >= m_count:
        _hint(mdl, hint)
    solver = _solver(time_limit_s - (time.perf_counter() - started), workers)
    code = solver.solve(mdl.model)
    return _result(mdl, solver, code, (time.perf_counter() - started) * 1e3)


def _candidates(problem: Problem, t: Tables) -> list[Device]:
    """Devices that can hold at least their cheapest single layer (no other ever takes part)."""
    L = t.L
    smallest = min(
        t.memory(i, i + 1) - (t.embed if i == 0 else 0) - (t.head if i + 1 == L else 0)
        for i in range(L)
    )
    return [d for d in problem.devices if problem.usable(d) >= smallest]


def _solver(time_limit_s: float, workers: int) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.01, time_limit_s)
    solver.parameters.num_workers = workers
    # Measured on 16-device fleets: without presolve the complete greedy hint is a solution at
    # once; with presolve a 60 ms budget often ends with no solution at all.
    solver.parameters.cp_model_presolve = False
    solver.parameters.linearization_level = LINEARIZATION
    return solver


def solve_moves(
    problem: Problem,
    m_count: int,
    previous: Sequence[Stage],
    *,
    limit_units: int | None,
    anchor: tuple[StagePlan, ...],
    slack: float,
    hint: tuple[StagePlan, ...] | None,
    time_limit_s: float,
    lower_bound_ms: float = 0.0,
    tables: Tables | None = None,
) -> SolveResult:
    """Phase 2 at M = ``m_count``: the plan loading the fewest weight bytes given what
    ``previous`` holds, with P at most ``limit_units``, or (None) ``(1 + slack)`` x the P of
    ``anchor``, phase 1's plan at this M, in this model's own arithmetic (so phase 1's plan is
    always within the bound, also at slack 0). ``hint`` (default ``anchor``) starts the search;
    the reply's ``limit_units`` is the bound used, for the other M to share."""
    started = time.perf_counter()
    t = tables or Tables(problem)
    devs = _candidates(problem, t)
    index = {dev.ref: d for d, dev in enumerate(devs)}
    resident = {
        index[s.device]: (s.layer_start, s.layer_end, t.weights(s.layer_start, s.layer_end))
        for s in previous
        if s.device in index and s.layer_end <= t.L
    }
    if not devs:
        return SolveResult(None, m_count, "infeasible", wall_ms=_since(started))
    mdl = build(problem, t, devs, m_count, lower_bound_ms, resident)
    if limit_units is None:
        layout = _layout(mdl, anchor)
        if layout is None:
            return SolveResult(None, m_count, "unknown", wall_ms=_since(started))
        limit_units = math.floor(_values(mdl, *layout)[-1] * (1.0 + slack))
    _fewest_moves(mdl, limit_units)
    start = hint if hint is not None and len(hint) >= m_count else anchor
    if len(start) >= m_count and _hint(mdl, start):
        by_dev = {index[st.device.ref]: (st.layer_start, st.layer_end) for st in start}
        for d, keep in mdl.keep.items():
            mdl.model.add_hint(keep, by_dev.get(d) == mdl.resident[d][:2])
    solver = _solver(time_limit_s - (time.perf_counter() - started), 1)
    code = solver.solve(mdl.model)
    res = _result(mdl, solver, code, _since(started))
    # The objective is bytes, not P: its bound says nothing about the step time.
    return dataclasses.replace(res, bound_ms=None, gap_pct=None, limit_units=limit_units)


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


def _result(
    mdl: _Model, solver: cp_model.CpSolver, code: cp_model.CpSolverStatus, wall: float
) -> SolveResult:
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        stages = sorted(
            (
                StagePlan(mdl.devs[d], solver.value(mdl.s[d]), solver.value(mdl.e[d]))
                for d in range(mdl.D)
                if solver.value(mdl.u[d])
            ),
            key=lambda st: st.layer_start,
        )
        obj = solver.objective_value
        bound = solver.best_objective_bound
        gap = max(0.0, (obj - bound) / obj * 100.0) if obj > 0 else 0.0
        optimal = code == cp_model.OPTIMAL and mdl.exact
        bound_ms = (bound // mdl.tie_span) / TIME_UNITS_PER_MS if mdl.exact else None
        return SolveResult(
            tuple(stages),
            mdl.m_count,
            "optimal" if optimal else "feasible",
            0.0 if optimal else gap,
            wall,
            bound_ms,
        )
    if code == cp_model.INFEASIBLE:
        return SolveResult(None, mdl.m_count, "infeasible", wall_ms=wall)
    return SolveResult(None, mdl.m_count, "unknown", wall_ms=wall)


def _same_links(problem: Problem, a: Device, b: Device, members: list[Device]) -> bool:
    """a and b connect to every other device of their node the same way (swappable)."""
    f = problem.fleet
    return all(
        f.link(a, o) == f.link(b, o) for o in members if o is not a and o is not b
    ) and f.link(a, b) == f.link(b, a)


def _node_intra_same(problem: Problem, xs: list[Device], ys: list[Device]) -> bool:
    f = problem.fleet
    lx = sorted(
        (f.link(a, b).gbytes_per_s, f.link(a, b).latency_ms) for a in xs for b in xs if a is not b
    )
    ly = sorted(
        (f.link(a, b).gbytes_per_s, f.link(a, b).latency_ms) for a in ys for b in ys if a is not b
    )
    return lx == ly


_Layout = tuple[dict[int, StagePlan], list[int], dict[int, int]]


def _layout(mdl: _Model, plan: tuple[StagePlan, ...]) -> _Layout | None:
    """(stage by device index, the nodes in pipeline order, each node's last layer end) of a
    plan, or None when the model cannot take it (an unknown device, a node visited twice)."""
    index = {dev.ref: d for d, dev in enumerate(mdl.devs)}
    if any(st.device.ref not in index for st in plan):
        return None
    by_dev = {index[st.device.ref]: st for st in plan}
    node_seq: list[int] = []
    for st in plan:
        k = mdl.node_of(index[st.device.ref])
        if not node_seq or node_seq[-1] != k:
            node_seq.append(k)
    if len(set(node_seq)) != len(node_seq):
        return None  # not node-contiguous
    node_end = {
        k: max(by_dev[d].layer_end for d in by_dev if mdl.node_of(d) == k) for k in node_seq
    }
    return by_dev, node_seq, node_end


def _hint(mdl: _Model, plan: tuple[StagePlan, ...]) -> bool:
    """A complete hint (every decision variable), so CP-SAT starts from the greedy plan as a
    solution instead of having to repair a partial one; False when the model cannot take the
    plan. Derived values (times, hops, P) get their least values too (``_values``)."""
    m = mdl.model
    layout = _layout(mdl, plan)
    if layout is None:
        return False
    by_dev, node_seq, node_end = layout
    for d in range(mdl.D):
        st = by_dev.get(d)
        m.add_hint(mdl.u[d], st is not None)
        m.add_hint(mdl.n[d], st.layer_end - st.layer_start if st else 0)
        m.add_hint(mdl.s[d], st.layer_start if st else 0)
        m.add_hint(mdl.e[d], st.layer_end if st else 0)
        m.add_hint(mdl.first[d], bool(st and st.layer_start == 0))
        m.add_hint(mdl.last[d], bool(st and st.layer_end == mdl.L))
        m.add_hint(mdl.lastn[d], bool(st and node_end[mdl.node_of(d)] == st.layer_end))
    for k, name in enumerate(mdl.names):
        used = [d for d in mdl.members[name] if d in by_dev]
        m.add_hint(mdl.used_k[k], bool(used))
        m.add_hint(mdl.st[k], k == node_seq[0])
        m.add_hint(mdl.en[k], k == node_seq[-1])
        m.add_hint(mdl.ns[k], min(by_dev[d].layer_start for d in used) if used else 0)
        m.add_hint(mdl.ne[k], max(by_dev[d].layer_end for d in used) if used else 0)
    if mdl.multi is not None:
        m.add_hint(mdl.multi, len(plan) >= 2)
    for d, both in mdl.both.items():
        st = by_dev.get(d)
        m.add_hint(both, bool(st and st.layer_start == 0 and st.layer_end == mdl.L))
    if mdl.arcs:
        depot = len(mdl.names)
        chosen = set(zip([depot, *node_seq], [*node_seq, depot], strict=True))
        for key, lit in mdl.arcs.items():
            m.add_hint(lit, key in chosen)
    same = len(plan) >= 2 and node_seq[0] == node_seq[-1]
    if mdl.same_ends is not None:
        m.add_hint(mdl.same_ends, same)
        for k, z in enumerate(mdl.ends_at):
            m.add_hint(z, same and k == node_seq[0])
    times, hops, ret, step = _values(mdl, *layout)
    for d in range(mdl.D):
        m.add_hint(mdl.time[d], times[d])
        m.add_hint(mdl.hop[d], hops[d])
    assert mdl.ret is not None and mdl.step is not None
    m.add_hint(mdl.ret, ret)
    m.add_hint(mdl.step, step)
    return True


def _values(
    mdl: _Model, by_dev: dict[int, StagePlan], node_seq: list[int], node_end: dict[int, int]
) -> tuple[list[int], list[int], int, int]:
    """(times, hops, return hop, P) of a plan in this model's units, each at the least value
    its constraints allow: the plan's figures as the model sees them."""
    times: list[int] = []
    hops: list[int] = []
    for d in range(mdl.D):
        st = by_dev.get(d)
        t_value = hop_value = 0
        if st is not None:
            dev, k = mdl.devs[d], mdl.node_of(d)
            is_last = st.layer_end == mdl.L
            read = mdl.read_prefix[st.layer_end] - mdl.read_prefix[st.layer_start]
            read += mdl.head_read if is_last else 0
            t_value = -(-KIB * read // max(1, math.floor(dev.bandwidth_gbps * 100)))
            if dev.tflops > 0:
                work = mdl.flops_prefix[st.layer_end] - mdl.flops_prefix[st.layer_start]
                work += mdl.head_flops if is_last else 0
                t_value = max(t_value, -(-work // max(1, math.floor(dev.tflops * 100))))
            if node_end[k] != st.layer_end:
                hop_value = min(mdl.hop_units(d, o) for o in mdl.members[mdl.names[k]] if o != d)
            elif not is_last:
                hop_value = mdl.node_hop[k][node_seq[node_seq.index(k) + 1]]
        times.append(t_value)
        hops.append(hop_value)
    ret = _return_value(mdl, node_seq, len(by_dev) >= 2)
    step = max(sum(times) + sum(hops) + ret, mdl.m_count * max(times), mdl.lower_units)
    return times, hops, ret, step


def _return_value(mdl: _Model, node_seq: list[int], multi: bool) -> int:
    """The return hop's least value for a plan visiting ``node_seq`` (see _return_hop)."""
    first, last = node_seq[0], node_seq[-1]
    if not multi:
        return 0
    if first == last:
        members = mdl.members[mdl.names[first]]
        return min(mdl.return_units(a, b) for a in members for b in members if a != b)
    rep = [mdl.members[name][0] for name in mdl.names]
    K = len(mdl.names)
    cross = {mdl.return_units(rep[k], rep[j]) for k in range(K) for j in range(K) if k != j}
    if len(cross) == 1 or K > CIRCUIT_MAX_NODES:
        return min(cross)
    return mdl.return_units(rep[last], rep[first])
