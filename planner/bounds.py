"""Lower bounds on the bottleneck, for proofs and for pruning the CP-SAT search.

``integer_bound_ms`` is tighter than the fluid bound because it keeps layers whole: for a
bottleneck T, device ``d`` can hold at most ``floor((T - hop) x bandwidth / layer_read)`` layers
(and what fits its memory), so a plan with bottleneck T exists only if those capacities add up
to L. It relaxes everything else (which device is first, last, which node pays the slow hop)
in the plan's favour, so it never exceeds the true optimum; when a plan meets it, that plan is
optimal. With layers of unequal size it uses the smallest layer (weaker, still valid).
"""

from __future__ import annotations

import math

import numpy as np

from shardplane.planner.cost import WORKSPACE_BYTES, Problem, Tables
from shardplane.planner.fleet import Device


class _Prep:
    """Per-device figures the bound needs, computed once per problem (not per bisection step)."""

    def __init__(self, problem: Problem, t: Tables) -> None:
        p = problem.profile
        kv = problem.kv_tokens
        reads = p.read_bytes(problem.batch)
        self.L = t.L
        self.r = min(reads[i] + p.kv_bytes_per_token[i] * kv for i in range(t.L))
        self.mem = min(p.layer_bytes[i] + p.kv_bytes_per_token[i] * kv for i in range(t.L))
        self.embed, self.head = t.embed, t.head
        self.both_ends = t.embed + t.head - t.tied  # a single stage: a tied matrix once
        by_node: dict[str, list[Device]] = {}
        for d in problem.devices:
            by_node.setdefault(d.node, []).append(d)
        # For each node: rows of (ref, bytes/ms, usable-after-workspace, intra hop, cross hop).
        self.nodes: list[list[tuple[str, float, int, float, float]]] = []
        # Links between nodes do not depend on the device, so the cheapest hop out of a node is
        # found over node representatives: O(nodes²), not O(devices²).
        reps = {node: members[0] for node, members in by_node.items()}
        for node, members in by_node.items():
            cross = min(
                (t.hop(members[0], o) for n2, o in reps.items() if n2 != node), default=math.inf
            )
            self.nodes.append(
                [
                    (
                        d.ref,
                        d.bandwidth_gbps * 1e6,
                        problem.usable(d) - WORKSPACE_BYTES,
                        min((t.hop(d, o) for o in members if o is not d), default=math.inf),
                        cross,
                    )
                    for d in members
                ]
            )


def caps_reference(pp: _Prep, T: float) -> int:
    """An upper bound on the layers all devices can hold at bottleneck ``T`` (ms)."""
    r, mem = pp.r, pp.mem
    base_total = 0
    best_last = second_last = -math.inf
    best_last_dev = ""
    first_deltas: list[tuple[int, str]] = []
    only = 0  # a single stage holding everything

    for rows in pp.nodes:
        caps: list[tuple[str, int, int, int]] = []  # ref, intra role, cross role, last role
        for ref, bw, usable, intra, cross in rows:
            memcap = max(0, usable // mem)
            memcap_first = max(0, (usable - pp.embed) // mem)
            t_last = max(0, math.floor((T * bw - pp.head) / r + 1e-9))
            c_last = min(t_last, max(0, (usable - pp.head) // mem))
            only = max(only, min(t_last, max(0, (usable - pp.both_ends) // mem)))
            roles = [
                max(0, math.floor((T - h) * bw / r + 1e-9))
                for h in (intra, cross)
                if math.isfinite(h)
            ]
            c_intra = (
                min(max(0, math.floor((T - intra) * bw / r + 1e-9)), memcap)
                if math.isfinite(intra)
                else -1
            )
            c_cross = (
                min(max(0, math.floor((T - cross) * bw / r + 1e-9)), memcap)
                if math.isfinite(cross)
                else -1
            )
            d_first = max((min(tc, memcap_first) - min(tc, memcap) for tc in roles), default=0)
            first_deltas.append((d_first, ref))
            caps.append((ref, c_intra, c_cross, c_last))
        # Every used node but the final one has one device paying the cross-node hop.
        if len(caps) == 1:
            ref, _ci, cc, cl = caps[0]
            base = max(cc, 0)
            base_total += base
            candidates = [(cl - base, ref)]
        else:
            loss, star = min((ci - max(cc, 0), i) for i, (_r, ci, cc, _cl) in enumerate(caps))
            base_total += sum(max(ci, 0) for _r, ci, _cc, _cl in caps) - loss
            candidates = [
                (cl - max(cc, 0), ref) if i == star else (cl - max(ci, 0) + loss, ref)
                for i, (ref, ci, cc, cl) in enumerate(caps)
            ]
        for delta, ref in candidates:
            if delta > best_last:
                second_last = best_last
                best_last, best_last_dev = delta, ref
            elif delta > second_last:
                second_last = delta
    best = -math.inf
    for delta_f, ref in first_deltas:
        last = best_last if ref != best_last_dev else second_last
        if math.isfinite(last):
            best = max(best, delta_f + last)
    total = base_total + int(best) if math.isfinite(best) else -1
    return max(total, only)


class _Vec:
    """The same bound as :func:`caps_reference`, vectorised with numpy (one pass per bisection step
    instead of a Python loop over devices); ``caps_reference`` stays as the readable reference and the
    tests check they agree."""

    def __init__(self, pp: _Prep) -> None:
        rows = [(k, row) for k, node in enumerate(pp.nodes) for row in node]
        self.r, self.head = float(pp.r), float(pp.head)
        self.bw = np.array([row[1] for _, row in rows], dtype=np.float64)
        usable = np.array([row[2] for _, row in rows], dtype=np.float64)
        self.intra = np.array([row[3] for _, row in rows], dtype=np.float64)
        self.cross = np.array([row[4] for _, row in rows], dtype=np.float64)
        self.node = np.array([k for k, _ in rows], dtype=np.int64)
        sizes = np.bincount(self.node)
        self.single = sizes[self.node] == 1
        self.starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        mem = float(pp.mem)
        self.memcap = np.maximum(0.0, np.floor(usable / mem))
        self.memcap_first = np.maximum(0.0, np.floor((usable - pp.embed) / mem))
        self.memcap_last = np.maximum(0.0, np.floor((usable - pp.head) / mem))
        self.memcap_only = np.maximum(0.0, np.floor((usable - pp.both_ends) / mem))
        self.fin_intra = np.isfinite(self.intra)
        self.fin_cross = np.isfinite(self.cross)
        self.idx = np.arange(len(rows))

    def caps(self, T: float) -> float:
        with np.errstate(invalid="ignore"):
            tc_intra = np.where(
                self.fin_intra,
                np.maximum(0.0, np.floor((T - self.intra) * self.bw / self.r + 1e-9)),
                -1.0,
            )
            tc_cross = np.where(
                self.fin_cross,
                np.maximum(0.0, np.floor((T - self.cross) * self.bw / self.r + 1e-9)),
                -1.0,
            )
        t_last = np.maximum(0.0, np.floor((T * self.bw - self.head) / self.r + 1e-9))
        c_last = np.minimum(t_last, self.memcap_last)
        only = float(np.max(np.minimum(t_last, self.memcap_only)))
        c_intra = np.where(self.fin_intra, np.minimum(tc_intra, self.memcap), -1.0)
        c_cross = np.where(self.fin_cross, np.minimum(tc_cross, self.memcap), -1.0)
        neg = -np.inf
        d_intra = np.where(
            self.fin_intra,
            np.minimum(tc_intra, self.memcap_first) - np.minimum(tc_intra, self.memcap),
            neg,
        )
        d_cross = np.where(
            self.fin_cross,
            np.minimum(tc_cross, self.memcap_first) - np.minimum(tc_cross, self.memcap),
            neg,
        )
        d_first = np.maximum(d_intra, d_cross)
        d_first = np.where(np.isfinite(d_first), d_first, 0.0)
        cc0 = np.maximum(c_cross, 0.0)
        ci0 = np.maximum(c_intra, 0.0)
        loss = np.where(self.single, np.inf, c_intra - cc0)
        node_mins = np.minimum.reduceat(loss, self.starts)  # inf for one-device nodes
        node_loss = node_mins[self.node]
        # One-device nodes count their cross role; larger nodes all-intra less the cheapest
        # switch of one device to the cross role (ties share the star's value, see caps_reference).
        base_total = float(np.sum(np.where(self.single, cc0, ci0))) - float(
            np.sum(node_mins[np.isfinite(node_mins)])
        )
        star = self.single | (loss <= node_loss)
        cand = np.where(
            star, c_last - cc0, c_last - ci0 + np.where(np.isfinite(node_loss), node_loss, 0.0)
        )
        if len(cand) < 2:
            return max(-1.0, only)
        first_arg = int(np.argmax(d_first))
        top1 = float(d_first[first_arg])
        top2 = float(np.max(np.delete(d_first, first_arg)))
        best = float(np.max(cand + np.where(self.idx == first_arg, top2, top1)))
        return max(base_total + best, only)


def integer_bound_ms(
    problem: Problem, hi_ms: float, tables: Tables | None = None, rel_tol: float = 1e-7
) -> float:
    """The smallest bottleneck (within ``rel_tol``) at which the layer capacities reach L,
    searched below ``hi_ms`` (a known plan's bottleneck). Throughput objective only."""
    t = tables or Tables(problem)
    if not problem.devices or not math.isfinite(hi_ms):
        return 0.0
    lo = t.read(0, t.L) / (sum(d.bandwidth_gbps for d in problem.devices) * 1e6)  # fluid bound
    hi = hi_ms
    pp = _Prep(problem, t)
    caps = _Vec(pp).caps
    if caps(hi) < t.L:
        return hi  # should not happen for a real plan; never claim more than it proves
    for _ in range(100):
        if hi - lo <= rel_tol * hi:
            break
        mid = (lo + hi) / 2
        if caps(mid) >= t.L:
            hi = mid
        else:
            lo = mid
    return lo
