"""CP-SAT placement: which devices take part, their pipeline order and their layer counts.

The model (one set of variables per candidate device ``d``):

- ``u[d]`` used; ``s[d]``, ``n[d]``, ``e[d] = s[d] + n[d]`` its layer range as an optional
  interval. The intervals do not overlap and their lengths sum to L, so the used devices tile
  ``[0, L)``: the order of the pipeline *is* the order of the starts.
- Devices of one node sit inside that node's block (an interval of the node's total length);
  node blocks do not overlap, so every node's devices are contiguous in the pipeline and the
  plan crosses each slow link at most once per node.
- A stage's bytes come from prefix tables (AddElement on start and end), so layers of unequal
  size cost what they really cost; uniform layers use the linear ``n x bytes`` instead.
- First stage (``s == 0``) holds the embeddings, last (``e == L``) the head, both in memory,
  the head also in time.
- Stage time in units of 100 ns: ``bandwidth x t ≥ bytes``; plus the hop to the next stage:
  the intra-node link for all but a node's last device, the link to the next node for the
  node's last device (an AddCircuit over nodes picks the next node when links differ), none
  for the final stage.
- throughput: minimise ``T ≥ t[d] + hop[d]``; latency: minimise ``sum t[d] + hop[d]``; then fewer
  stages and fewer nodes (lexicographic, folded into one objective).
- Symmetry: identical devices of one node are used in index order; identical nodes (when all
  links between nodes are the same) likewise.
- The greedy plan is the hint; the time limit bounds the search.

Integer rounding: bytes are KiB (memory rounded up against usable rounded down, so a plan the
model accepts really fits); times round up to 100 ns. The caller re-evaluates the plan in
floating point with the cost model and keeps the better of it and the hint.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ortools.sat.python import cp_model

from shardplane.planner.cost import WORKSPACE_BYTES, Problem, StagePlan, Tables
from shardplane.planner.fleet import Device

KIB = 1024
TIME_UNITS_PER_MS = 10_000  # 100 ns
CIRCUIT_MAX_NODES = 40  # beyond this the next-node choice is approximated by the worst link


@dataclass(frozen=True, slots=True)
class SolveResult:
    plan: tuple[StagePlan, ...] | None
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    gap_pct: float | None = None
    wall_ms: float = 0.0
    bound_ms: float | None = None  # the solver's proven bound on the objective, ms


def _kib_up(x: int) -> int:
    return -(-x // KIB)


def solve(
    problem: Problem,
    *,
    hint: tuple[StagePlan, ...] | None,
    time_limit_s: float,
    workers: int = 1,
    lower_bound_ms: float = 0.0,
) -> SolveResult:
    started = time.perf_counter()
    t = Tables(problem)
    L = t.L
    # Devices that cannot hold even their cheapest single layer never take part.
    smallest = min(
        t.memory(i, i + 1) - (t.embed if i == 0 else 0) - (t.head if i + 1 == L else 0)
        for i in range(L)
    )
    devs: list[Device] = [d for d in problem.devices if problem.usable(d) >= smallest]
    if not devs:
        return SolveResult(None, "infeasible", wall_ms=(time.perf_counter() - started) * 1e3)
    D = len(devs)
    m = cp_model.CpModel()

    # Prefix tables: memory in exact bytes (a plan the model accepts fits, and the greedy hint,
    # packed to the byte, stays feasible); reads in KiB (time rounds up anyway).
    p = problem.profile
    reads = p.read_bytes(problem.batch)
    uniform = (
        len(set(p.layer_bytes)) == 1
        and len(set(reads)) == 1
        and len(set(p.kv_bytes_per_token)) == 1
    )
    if uniform:  # exact multiples of one rounded-up layer: linear, no element constraints
        mem_layer = p.layer_bytes[0] + p.kv_bytes_per_token[0] * problem.kv_tokens
        read_layer = _kib_up(reads[0] + p.kv_bytes_per_token[0] * problem.kv_tokens)
        mem_prefix = [mem_layer * i for i in range(L + 1)]
        read_prefix = [read_layer * i for i in range(L + 1)]
    else:
        mem_prefix = [t.W[i] + t.K[i] for i in range(L + 1)]
        read_prefix = [_kib_up(t.R[i] + t.K[i]) for i in range(L + 1)]
    head = _kib_up(t.head)  # read (KiB)
    hop_units: dict[tuple[int, int], int] = {}  # hop from devs[i] to devs[j], time units

    def hop(i: int, j: int) -> int:
        key = (i, j)
        if key not in hop_units:
            hop_units[key] = math.ceil(problem.hop_ms(devs[i], devs[j]) * TIME_UNITS_PER_MS)
        return hop_units[key]

    u = [m.new_bool_var(f"u{d}") for d in range(D)]
    n = [m.new_int_var(0, L, f"n{d}") for d in range(D)]
    s = [m.new_int_var(0, L, f"s{d}") for d in range(D)]
    e = [m.new_int_var(0, L, f"e{d}") for d in range(D)]
    iv = [m.new_optional_interval_var(s[d], n[d], e[d], u[d], f"iv{d}") for d in range(D)]
    m.add_no_overlap(iv)
    m.add(sum(n) == L)
    first = [m.new_bool_var(f"first{d}") for d in range(D)]
    last = [m.new_bool_var(f"last{d}") for d in range(D)]
    t_d = [m.new_int_var(0, 10**12, f"t{d}") for d in range(D)]
    for d in range(D):
        m.add(n[d] >= 1).only_enforce_if(u[d])
        m.add(n[d] == 0).only_enforce_if(~u[d])
        m.add(s[d] == 0).only_enforce_if(~u[d])
        m.add_implication(first[d], u[d])
        m.add_implication(last[d], u[d])
        m.add(s[d] == 0).only_enforce_if(first[d])
        m.add(s[d] >= 1).only_enforce_if(u[d], ~first[d])
        m.add(e[d] == L).only_enforce_if(last[d])
        m.add(e[d] <= L - 1).only_enforce_if(u[d], ~last[d])
        if uniform:
            mem_layers = n[d] * mem_prefix[1]
            read_layers = n[d] * read_prefix[1]
        else:
            ms_, me_ = (
                m.new_int_var(0, mem_prefix[L], f"ms{d}"),
                m.new_int_var(0, mem_prefix[L], f"me{d}"),
            )
            rs_, re_ = (
                m.new_int_var(0, read_prefix[L], f"rs{d}"),
                m.new_int_var(0, read_prefix[L], f"re{d}"),
            )
            m.add_element(s[d], mem_prefix, ms_)
            m.add_element(e[d], mem_prefix, me_)
            m.add_element(s[d], read_prefix, rs_)
            m.add_element(e[d], read_prefix, re_)
            mem_layers = me_ - ms_
            read_layers = re_ - rs_
        usable = problem.usable(devs[d])
        ends = t.embed * first[d] + t.head * last[d]
        if t.tied:  # a single stage holds a tied embedding/head matrix once (Tables.weights)
            both = m.new_bool_var(f"both{d}")
            m.add_implication(both, first[d])
            m.add_implication(both, last[d])
            ends -= t.tied * both
        m.add(mem_layers + ends + WORKSPACE_BYTES * u[d] <= usable)
        bw = max(1, round(devs[d].bandwidth_gbps * 100))
        # t[d] (100 ns units) >= KiB x 1024 / (GB/s x 1e9) x 1e7 = KiB x 1024 / (GB/s x 100)
        m.add(bw * t_d[d] >= KIB * (read_layers + head * last[d]))
    m.add(sum(first) == 1)
    m.add(sum(last) == 1)
    if problem.max_stages is not None:
        m.add(sum(u) <= problem.max_stages)

    # Nodes: contiguous blocks.
    by_node: dict[str, list[int]] = {}
    for d, dev in enumerate(devs):
        by_node.setdefault(dev.node, []).append(d)
    names = list(by_node)
    K = len(names)
    used_k: list[cp_model.IntVar] = []
    ns: list[cp_model.IntVar] = []
    ne: list[cp_model.IntVar] = []
    node_iv: list[cp_model.IntervalVar] = []
    lastn = [m.new_bool_var(f"lastn{d}") for d in range(D)]
    for k, name in enumerate(names):
        members = by_node[name]
        uk = m.new_bool_var(f"used_{k}")
        m.add_max_equality(uk, [u[d] for d in members])
        size = m.new_int_var(0, L, f"size_{k}")
        m.add(size == sum(n[d] for d in members))
        a, b = m.new_int_var(0, L, f"ns_{k}"), m.new_int_var(0, L, f"ne_{k}")
        node_iv.append(m.new_optional_interval_var(a, size, b, uk, f"niv_{k}"))
        m.add(a == 0).only_enforce_if(~uk)
        for d in members:
            m.add(s[d] >= a).only_enforce_if(u[d])
            m.add(e[d] <= b).only_enforce_if(u[d])
            m.add_implication(lastn[d], u[d])
            m.add(e[d] == b).only_enforce_if(lastn[d])
            m.add(e[d] <= b - 1).only_enforce_if(u[d], ~lastn[d])
        used_k.append(uk)
        ns.append(a)
        ne.append(b)
    m.add_no_overlap(node_iv)

    # Hops. Cross-node hop values between distinct nodes (device-independent between nodes).
    node_hop = [[0] * K for _ in range(K)]
    for k in range(K):
        for j in range(K):
            if k != j:
                node_hop[k][j] = hop(by_node[names[k]][0], by_node[names[j]][0])
    cross_values = {node_hop[k][j] for k in range(K) for j in range(K) if k != j}
    exact_hops = True
    out_hop: list[cp_model.LinearExprT] = []
    arc_vars: dict[tuple[int, int], cp_model.IntVar] = {}
    if len(cross_values) <= 1:
        h = next(iter(cross_values), 0)
        out_hop = [h] * K
    elif K <= CIRCUIT_MAX_NODES:
        arcs: list[tuple[int, int, cp_model.LiteralT]] = []
        depot = K
        outs: list[list[tuple[cp_model.IntVar, int]]] = [[] for _ in range(K)]
        for k in range(K):
            arcs.append((k, k, ~used_k[k]))
            st = m.new_bool_var(f"start_{k}")
            en = m.new_bool_var(f"end_{k}")
            arc_vars[(depot, k)] = st
            arc_vars[(k, depot)] = en
            arcs.append((depot, k, st))
            arcs.append((k, depot, en))
            m.add(ns[k] == 0).only_enforce_if(st)
            m.add(ne[k] == L).only_enforce_if(en)
            for j in range(K):
                if j != k:
                    lit = m.new_bool_var(f"arc_{k}_{j}")
                    arc_vars[(k, j)] = lit
                    arcs.append((k, j, lit))
                    m.add(ne[k] == ns[j]).only_enforce_if(lit)
                    outs[k].append((lit, node_hop[k][j]))
        m.add_circuit(arcs)
        out_hop = [sum(c * lit for lit, c in outs[k]) for k in range(K)]
    else:
        exact_hops = False
        out_hop = [max(node_hop[k][j] for j in range(K) if j != k) for k in range(K)]

    hop_d = [m.new_int_var(0, 10**9, f"hop{d}") for d in range(D)]
    for k, name in enumerate(names):
        members = by_node[name]
        for d in members:
            others = [hop(d, o) for o in members if o != d]
            if len(set(others)) > 1:
                exact_hops = False  # mixed NVLink/PCIe inside a node: we charge the slowest
            if others:
                m.add(hop_d[d] >= max(others)).only_enforce_if(u[d], ~lastn[d])
            m.add(hop_d[d] >= out_hop[k]).only_enforce_if(lastn[d], ~last[d])

    # Symmetry: identical devices within a node, in index order.
    for name in names:
        members = by_node[name]
        for a_, b_ in itertools.pairwise(members):
            da, db = devs[a_], devs[b_]
            if da.signature(problem.headroom) == db.signature(problem.headroom) and _same_links(
                problem, da, db, [devs[x] for x in members]
            ):
                m.add_implication(u[b_], u[a_])
                m.add(s[a_] < s[b_]).only_enforce_if(u[b_])
    if len(cross_values) <= 1:
        sig = {
            k: tuple(sorted(devs[d].signature(problem.headroom) for d in by_node[names[k]]))
            for k in range(K)
        }
        prev: dict[tuple[object, ...], int] = {}
        for k in range(K):
            key = sig[k] + (len(by_node[names[k]]),)
            if key in prev and _node_intra_same(
                problem,
                [devs[d] for d in by_node[names[prev[key]]]],
                [devs[d] for d in by_node[names[k]]],
            ):
                j = prev[key]
                m.add_implication(used_k[k], used_k[j])
                m.add(ns[j] < ns[k]).only_enforce_if(used_k[k])
            prev[key] = k

    # Objective: primary value, then fewer stages, then fewer nodes.
    tie = sum(u) + sum(used_k)
    tie_span = D + K + 1
    objective_var: cp_model.IntVar | None = None
    if problem.objective == "latency":
        primary = sum(t_d) + sum(hop_d)
        m.minimize(primary * tie_span + tie)
    else:
        T = m.new_int_var(0, 10**12, "T")
        objective_var = T
        for d in range(D):
            m.add(t_d[d] + hop_d[d] <= T)
        # A proven bound on the bottleneck (planner.bounds) spares the search most of its proof.
        m.add(math.floor(lower_bound_ms * TIME_UNITS_PER_MS * (1 - 1e-9)) <= T)
        primary = T
        m.minimize(T * tie_span + tie)

    if hint:
        _hint(
            m,
            devs,
            hint,
            L=L,
            u=u,
            n=n,
            s=s,
            e=e,
            first=first,
            last=last,
            lastn=lastn,
            used_k=used_k,
            ns=ns,
            ne=ne,
            names=names,
            by_node=by_node,
            t_d=t_d,
            hop_d=hop_d,
            arc_vars=arc_vars,
            node_hop=node_hop,
            hop=hop,
            read_prefix=read_prefix,
            head=head,
            objective_var=objective_var,
            uniform_hops=len(cross_values) <= 1,
            out_const=[h for h in out_hop if isinstance(h, int)],
        )

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(
        0.01, time_limit_s - (time.perf_counter() - started)
    )
    solver.parameters.num_workers = workers
    # Measured on 16-device fleets: without presolve and with the lightest linearisation the
    # complete greedy hint is a solution at once and proofs come 2-3x sooner; with presolve a
    # 60 ms budget often ends with no solution at all.
    solver.parameters.cp_model_presolve = False
    solver.parameters.linearization_level = 0
    code = solver.solve(m)
    wall = (time.perf_counter() - started) * 1e3
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        stages = sorted(
            (
                StagePlan(devs[d], solver.value(s[d]), solver.value(e[d]))
                for d in range(D)
                if solver.value(u[d])
            ),
            key=lambda st: st.layer_start,
        )
        obj = solver.objective_value
        bound = solver.best_objective_bound
        gap = max(0.0, (obj - bound) / obj * 100.0) if obj > 0 else 0.0
        optimal = code == cp_model.OPTIMAL and exact_hops
        bound_ms = (bound // tie_span) / TIME_UNITS_PER_MS if exact_hops else None
        return SolveResult(
            tuple(stages),
            "optimal" if optimal else "feasible",
            0.0 if optimal else gap,
            wall,
            bound_ms,
        )
    if code == cp_model.INFEASIBLE:
        return SolveResult(None, "infeasible", wall_ms=wall)
    del primary
    return SolveResult(None, "unknown", wall_ms=wall)


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


def _hint(
    m: cp_model.CpModel,
    devs: list[Device],
    hint: tuple[StagePlan, ...],
    *,
    L: int,
    u: list[cp_model.IntVar],
    n: list[cp_model.IntVar],
    s: list[cp_model.IntVar],
    e: list[cp_model.IntVar],
    first: list[cp_model.IntVar],
    last: list[cp_model.IntVar],
    lastn: list[cp_model.IntVar],
    used_k: list[cp_model.IntVar],
    ns: list[cp_model.IntVar],
    ne: list[cp_model.IntVar],
    names: list[str],
    by_node: dict[str, list[int]],
    t_d: list[cp_model.IntVar],
    hop_d: list[cp_model.IntVar],
    arc_vars: dict[tuple[int, int], cp_model.IntVar],
    node_hop: list[list[int]],
    hop: Callable[[int, int], int],
    read_prefix: list[int],
    head: int,
    objective_var: cp_model.IntVar | None,
    uniform_hops: bool,
    out_const: list[int],
) -> None:
    """A complete hint (every variable), so CP-SAT starts from the greedy plan as a solution
    instead of having to repair a partial one."""
    index = {dev.ref: d for d, dev in enumerate(devs)}
    if any(st.device.ref not in index for st in hint):
        return
    by_dev = {index[st.device.ref]: st for st in hint}
    order = [index[st.device.ref] for st in hint]
    node_of = {d: k for k, name in enumerate(names) for d in by_node[name]}
    node_seq: list[int] = []
    for d in order:
        if not node_seq or node_seq[-1] != node_of[d]:
            node_seq.append(node_of[d])
    if len(set(node_seq)) != len(node_seq):
        return  # not node-contiguous: the model cannot take it
    last_in_node = {
        k: max((d for d in order if node_of[d] == k), key=lambda d: by_dev[d].layer_end)
        for k in node_seq
    }
    worst = 0
    for d in range(len(devs)):
        st = by_dev.get(d)
        used = st is not None
        m.add_hint(u[d], used)
        m.add_hint(n[d], st.layer_end - st.layer_start if st else 0)
        m.add_hint(s[d], st.layer_start if st else 0)
        m.add_hint(e[d], st.layer_end if st else 0)
        m.add_hint(first[d], bool(st and st.layer_start == 0))
        is_last = bool(st and st.layer_end == L)
        m.add_hint(last[d], is_last)
        k = node_of[d]
        is_lastn = used and last_in_node.get(k) == d
        m.add_hint(lastn[d], is_lastn)
        hop_value = 0
        if st is not None:
            if not is_lastn:
                hop_value = max(hop(d, o) for o in by_node[names[k]] if o != d)
            elif not is_last:
                pos = node_seq.index(k)
                nxt = node_seq[pos + 1]
                hop_value = out_const[k] if uniform_hops and out_const else node_hop[k][nxt]
            read = (
                read_prefix[st.layer_end] - read_prefix[st.layer_start] + (head if is_last else 0)
            )
            bw = max(1, round(devs[d].bandwidth_gbps * 100))
            t_value = -(-KIB * read // bw)
        else:
            t_value = 0
        m.add_hint(hop_d[d], hop_value)
        m.add_hint(t_d[d], t_value)
        worst = max(worst, t_value + hop_value)
    for k, name in enumerate(names):
        members = [d for d in by_node[name] if d in by_dev]
        m.add_hint(used_k[k], bool(members))
        m.add_hint(ns[k], min(by_dev[d].layer_start for d in members) if members else 0)
        m.add_hint(ne[k], max(by_dev[d].layer_end for d in members) if members else 0)
    if arc_vars:
        depot = len(names)
        chosen = set(zip([depot, *node_seq], [*node_seq, depot], strict=True))
        for key, lit in arc_vars.items():
            m.add_hint(lit, key in chosen)
    if objective_var is not None:
        m.add_hint(objective_var, worst)
