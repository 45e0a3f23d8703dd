"""Lower bounds on the step time P(M), for proofs (``status: optimal``) and the reported gap.

For each M the request allows (micro-batches of b = ceil(B / M)), any plan has

    P(M) >= M x max_s t_s(b)      and      P(M) >= sum_s t_s(b) + hops

and each term has a bound that keeps layers whole:

- **busiest stage** (``busiest_bound_ms``): at a cap T on every t_s(b), device d holds at most
  ``floor(T / tau_d)`` layers (tau_d: one layer's time on d; the last stage also pays the head)
  and what fits its memory (the first stage also holds the embeddings, the last the head). No
  plan has all its stages under T unless those capacities reach L; bisection finds the smallest
  such T. Everything else (which devices, their order) is relaxed in the plan's favour.
- **round trip** (``round_trip_bound_ms``): the layers at their cheapest, filling the devices
  fastest per layer first up to their memory, plus the head on the fastest device; when no
  device holds the whole model, a forward hop and the return hop at the fleet's lowest link
  latency. The memory and FLOPs terms are bounded separately (t_s is at least each).

The bound for the request is the smallest over M of the largest of these and the fluid bound;
when a plan meets it, that plan is optimal. With layers of unequal size the smallest layer
stands for every layer (weaker, still valid).
"""

from __future__ import annotations

import math

import numpy as np

from shardplane.planner.cost import WORKSPACE_BYTES, Problem, Tables, fluid_bound_ms
from shardplane.planner.fleet import NVLINK_LATENCY_MS, PCIE_LATENCY_MS

EPS = 1e-9


class _Caps:
    """Per-device figures of one micro-batch size, as numpy arrays (one pass per bisection
    step instead of a Python loop over devices)."""

    def __init__(self, problem: Problem, t: Tables) -> None:
        devs = problem.devices
        L = t.L
        self.L = L
        reads = [t.R[i + 1] - t.R[i] for i in range(L)]
        flops = [t.F[i + 1] - t.F[i] for i in range(L)]
        mems = [t.W[i + 1] - t.W[i] + t.K[i + 1] - t.K[i] for i in range(L)]
        self.r, self.f, mem = float(min(reads)), float(min(flops)), float(min(mems))
        self.hr, self.hf = float(t.head), float(t.head_flops)
        self.bw = np.array([d.bandwidth_gbps * 1e6 for d in devs])  # bytes per ms
        # FLOP per ms; an unknown figure means no compute term (infinitely fast arithmetic).
        self.fl = np.array([d.tflops * 1e9 if d.tflops > 0 else np.inf for d in devs])
        self.tau = np.maximum(self.r / self.bw, self.f / self.fl)
        usable = np.array([problem.usable(d) - WORKSPACE_BYTES for d in devs], dtype=np.float64)
        self.memcap = np.maximum(0.0, np.floor(usable / mem))
        self.memcap_first = np.maximum(0.0, np.floor((usable - t.embed) / mem))
        self.memcap_last = np.maximum(0.0, np.floor((usable - t.head) / mem))
        self.memcap_only = np.maximum(0.0, np.floor((usable - t.embed - t.head + t.tied) / mem))

    def capacity(self, T: float) -> float:
        """An upper bound on the layers the devices can hold with every t_s <= T."""
        by_time = np.floor(T / self.tau + EPS)
        mid = np.minimum(by_time, self.memcap)
        first = np.minimum(by_time, self.memcap_first) - mid
        with np.errstate(invalid="ignore", divide="ignore"):
            t_last = np.minimum(
                (T * self.bw - self.hr) / self.r, (T * self.fl - self.hf) / max(self.f, EPS)
            )
        t_last = np.maximum(0.0, np.floor(np.nan_to_num(t_last, nan=0.0, posinf=1e18) + EPS))
        last = np.minimum(t_last, self.memcap_last) - mid
        only = float(np.max(np.minimum(t_last, self.memcap_only)))
        base = float(np.sum(mid))
        if len(mid) < 2:
            return only
        # The first and the last stage are different devices: the best pair of adjustments.
        i = int(np.argmax(first))
        j = int(np.argmax(last))
        if i != j:
            adjust = float(first[i] + last[j])
        else:
            f2 = float(np.max(np.delete(first, i)))
            l2 = float(np.max(np.delete(last, j)))
            adjust = max(float(first[i]) + l2, f2 + float(last[j]))
        return max(base + adjust, only)

    def fill_under(self, T: float, per_layer: np.ndarray, order: np.ndarray) -> float:
        """The cheapest stage-time sum of the layers when every stage stays under T: each
        device holds at most what fits its memory and T, the cheapest per layer first; inf when
        they cannot hold every layer."""
        caps = np.minimum(self.memcap, np.floor(T / self.tau + EPS))[order]
        before = np.cumsum(caps) - caps
        take = np.clip(self.L - before, 0.0, caps)
        if float(np.sum(take)) < self.L:
            return math.inf
        return float(np.sum(take * per_layer[order]))

    def fill_ms(self, per_layer: np.ndarray, head_ms: float) -> float:
        """The round trip's stage times at their cheapest: layers on the devices cheapest per
        layer first, each up to its memory, plus the head at its cheapest."""
        left = float(self.L)
        total = head_ms
        for k in np.argsort(per_layer, kind="stable"):
            if left <= 0:
                break
            take = min(left, float(self.memcap[k]))
            total += take * float(per_layer[k])
            left -= take
        return total if left <= 0 else math.inf


def busiest_bound_ms(problem: Problem, t: Tables, hi_ms: float | None = None) -> float:
    """The smallest cap T (within 1e-7) on every t_s(b) at which the layer capacities reach L
    (``t`` holds the micro-batch size); inf when no cap makes them fit (memory)."""
    if not problem.devices:
        return 0.0
    caps = _Caps(problem, t)
    hi = hi_ms if hi_ms is not None and math.isfinite(hi_ms) else 0.0
    hi = max(hi, float(np.max(caps.tau)) * t.L + float(np.max(caps.hr / caps.bw)) + 1.0)
    if caps.capacity(hi) < t.L:
        return math.inf
    lo = 0.0
    for _ in range(80):
        if hi - lo <= 1e-7 * hi:
            break
        mid = (lo + hi) / 2
        if caps.capacity(mid) >= t.L:
            hi = mid
        else:
            lo = mid
    return lo


def _min_latency_ms(problem: Problem) -> float:
    fleet = problem.fleet
    found = [
        fleet.default_link.latency_ms,
        *(link.latency_ms for link in fleet.node_links.values()),
    ]
    nodes = [d.node for d in problem.devices]
    if len(set(nodes)) < len(nodes):  # some node has two devices: an intra-node hop exists
        found += [NVLINK_LATENCY_MS, PCIE_LATENCY_MS]
    return min(found)


def round_trip_bound_ms(problem: Problem, t: Tables) -> float:
    """A lower bound on one micro-batch's round trip, sum t_s(b) + hops (see module doc)."""
    if not problem.devices:
        return 0.0
    caps = _Caps(problem, t)
    by_read = caps.fill_ms(caps.r / caps.bw, caps.hr / float(np.max(caps.bw)))
    total = by_read
    if np.all(np.isfinite(caps.fl)):
        total = max(total, caps.fill_ms(caps.f / caps.fl, caps.hf / float(np.max(caps.fl))))
    if float(np.max(caps.memcap_only)) < t.L or problem.stage_floor > 1:
        total += 2 * _min_latency_ms(problem)
    return total


def joint_bound_ms(problem: Problem, m: int, tm: Tables, busiest_ms: float) -> float:
    """Both terms of P(m) at once: a plan whose busiest stage takes T has a round trip of at
    least the cheapest fill of the layers under T (which only falls as T grows), so P(m) >=
    min over T of max(round trip bound at T, m x T); bisection finds the crossing. T starts
    at ``busiest_ms``, the smallest cap any plan can meet."""
    caps = _Caps(problem, tm)
    per_read = caps.r / caps.bw
    known = bool(np.all(np.isfinite(caps.fl)))
    per_flops = caps.f / caps.fl
    order_read = np.argsort(per_read, kind="stable")
    order_flops = np.argsort(per_flops, kind="stable")
    ends = caps.hr / float(np.max(caps.bw))
    if known:
        ends = max(ends, caps.hf / float(np.max(caps.fl)))
    hop = 2 * _min_latency_ms(problem) if len(problem.devices) > 1 else 0.0
    only = float(np.max(caps.memcap_only))

    def trip(T: float) -> float:
        fill = caps.fill_under(T, per_read, order_read)
        if known:
            fill = max(fill, caps.fill_under(T, per_flops, order_flops))
        # A device holds the whole model under T only if its layers and head fit T and memory.
        alone = min(only, float(np.max(np.floor((T - ends) / caps.tau + EPS))))
        several = alone < tm.L or problem.stage_floor > 1 or m > 1
        return fill + ends + (hop if several else 0.0)

    lo = busiest_ms
    if not math.isfinite(lo):
        return math.inf
    hi = max(lo * 2, trip(lo) / m if math.isfinite(trip(lo)) else lo * 2)
    while not math.isfinite(trip(hi)) or trip(hi) > m * hi:
        if hi > 1e9:
            return m * lo
        hi *= 2
    if trip(lo) <= m * lo:
        return m * lo
    for _ in range(60):
        if hi - lo <= 1e-7 * hi:
            break
        mid = (lo + hi) / 2
        if trip(mid) > m * mid:
            lo = mid
        else:
            hi = mid
    # Below lo the trip bound exceeds trip(lo); above hi, m x T exceeds m x hi; between, both
    # are at least their value at the nearer end.
    return min(trip(lo), m * hi, max(trip(hi), m * lo))


def step_bound_ms(problem: Problem, m: int, t: Tables) -> float:
    """A lower bound on P(m) for any plan of this problem."""
    tm = t.for_m(m)
    busiest = busiest_bound_ms(problem, tm)
    return max(
        m * busiest,
        round_trip_bound_ms(problem, tm),
        joint_bound_ms(problem, m, tm, busiest),
        fluid_bound_ms(problem, m, t),
    )


def integer_bound_ms(problem: Problem, tables: Tables | None = None) -> float:
    """A lower bound on the step time of any plan the request allows: the smallest over its M
    of :func:`step_bound_ms` (inf when nothing can fit)."""
    t = tables or Tables(problem)
    choices = problem.all_m_choices()
    if not problem.devices or not choices:
        return math.inf
    return min(step_bound_ms(problem, m, t) for m in choices)
