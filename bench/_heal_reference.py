"""The fewest bytes a re-placement can load, by exhaustive search: bench heal's reference.

The planner's phase 2 (``planner.moves`` over ``planner.solver.solve_moves``) claims the fewest
weight bytes to load among plans within ``(1 + slack)`` of the best step time. To check that
claim the reference must not share the code it checks, so it has its own everything but the
definition of P(M) (``planner.schedule``, the arithmetic every part agrees on): no CP-SAT
model, no prefix tables of the planner, no bounds module, no candidate plans. It enumerates
every node-contiguous pipeline (like the planner's plans): the stage count, the device of each
stage, the layer split, and every M the request allows, depth first, in two passes:

1. T*: the least P(M) over every plan;
2. the fewest bytes loaded over every plan with P <= (1 + slack) x T*, where a stage loads
   nothing only if its device held exactly that layer range before (what a worker adopts).

Only provable bounds prune it (a partial pipeline's sum of stage and hop times, its busiest
stage x M, and the remaining layers' reads over the fastest unused device only grow; a range
that does not fit a device fits no longer range; the bytes loaded only grow), so the answer
is exact. Its cost grows with devices^stages x layers^stages before pruning: it is meant for
the demo fleet's handful of devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from shardplane.bus.messages import Stage
from shardplane.planner import schedule
from shardplane.planner.cost import WORKSPACE_BYTES, Problem
from shardplane.planner.fleet import Device

REL_TOL = 1e-9  # two sums of the same floats in another order are equal within this


@dataclass(frozen=True, slots=True)
class Reference:
    step_ms: float  # T*: the least P of any plan
    bytes_minimal: int  # the fewest weight bytes loaded by a plan within (1 + slack) x T*
    plan: tuple[tuple[str, int, int], ...]  # one such plan: (device, start, end) per stage


class _Layers:
    """Prefix sums straight from the model profile for micro-batches of ``micro`` sequences."""

    def __init__(self, problem: Problem, micro: int) -> None:
        p = problem.profile
        ctx = problem.context_tokens
        self.L = p.layers
        reads = p.read_bytes(micro)
        kv = p.kv_bytes_per_token
        self.read = [0.0, *accumulate(reads[i] + kv[i] * ctx * micro for i in range(self.L))]
        self.flops = [0.0, *accumulate(f * micro for f in p.layer_flops_per_token(ctx))]
        self.kv = [0, *accumulate(kv[i] * ctx * problem.batch for i in range(self.L))]
        self.layer_bytes = [0, *accumulate(p.layer_bytes)]
        self.embed, self.head, self.tied = p.embed_bytes, p.head_bytes, p.tied_bytes
        self.head_flops = p.head_flops_per_token * micro
        self.act = p.activation_bytes_per_token * micro
        self.ids = schedule.TOKEN_ID_BYTES * micro

    def weights(self, a: int, e: int) -> int:
        first, last = a == 0, e == self.L
        w = self.layer_bytes[e] - self.layer_bytes[a]
        return w + self.embed * first + self.head * last - self.tied * (first and last)

    def memory(self, a: int, e: int) -> int:
        return self.weights(a, e) + self.kv[e] - self.kv[a] + WORKSPACE_BYTES

    def reads(self, a: int, e: int) -> float:
        return self.read[e] - self.read[a] + (self.head if e == self.L else 0)

    def stage_ms(self, d: Device, a: int, e: int) -> float:
        work = self.flops[e] - self.flops[a] + (self.head_flops if e == self.L else 0.0)
        return schedule.stage_ms(self.reads(a, e), work, d.bandwidth_gbps, d.tflops)


Prune = Callable[[float, int], bool]  # (lower bound on P, bytes loaded so far) -> skip
Visit = Callable[[float, int, tuple[tuple[str, int, int], ...]], None]


@dataclass
class _Walk:
    """One depth-first enumeration at one M."""

    problem: Problem
    layers: _Layers
    m: int
    held: frozenset[tuple[str, int, int]]
    prune: Prune
    visit: Visit

    def run(self) -> None:
        devices = sorted(self.problem.devices, key=lambda d: -d.bandwidth_gbps)
        self._step(devices, 0, [], 0.0, 0.0, 0, frozenset())

    def _hop(self, a: Device, b: Device, nbytes: float) -> float:
        link = self.problem.fleet.link(a, b)
        return schedule.link_ms(nbytes, link.gbytes_per_s, link.latency_ms)

    def _rest_ms(self, e: int, left: list[Device]) -> float | None:
        """A lower bound on the stage times still to come (None: the rest cannot fit)."""
        lay = self.layers
        if e == lay.L:
            return 0.0
        if not left or sum(self.problem.usable(d) for d in left) < lay.memory(e, lay.L):
            return None
        return lay.reads(e, lay.L) / (max(d.bandwidth_gbps for d in left) * 1e6)

    def _step(
        self,
        devices: list[Device],
        x: int,
        order: list[tuple[Device, int, int, float]],
        cycle: float,  # sum of the placed stages' times and the hops between them
        busiest: float,
        loaded: int,
        closed: frozenset[str],
    ) -> None:
        lay, p = self.layers, self.problem
        if x == lay.L:
            self._finish(order, cycle, busiest, loaded)
            return
        if len(order) == p.stage_limit:
            return
        used = {d.ref for d, *_ in order}
        here = order[-1][0].node if order else None
        for d in devices:
            if d.ref in used or d.node in closed:
                continue
            hop = self._hop(order[-1][0], d, lay.act) if order else 0.0
            now_closed = closed | {here} if here is not None and d.node != here else closed
            left = [o for o in devices if o.ref not in used and o is not d]
            top = x
            while top < lay.L and lay.memory(x, top + 1) <= p.usable(d):
                top += 1
            for e in range(top, x, -1):  # the longest stage first: good plans early
                t = lay.stage_ms(d, x, e)
                rest = self._rest_ms(e, left)
                if rest is None:
                    continue
                own = 0 if (d.ref, x, e) in self.held else lay.weights(x, e)
                bound = max(cycle + hop + t + rest, self.m * max(busiest, t))
                if self.prune(bound, loaded + own):
                    continue
                self._step(
                    devices,
                    e,
                    [*order, (d, x, e, t)],
                    cycle + hop + t,
                    max(busiest, t),
                    loaded + own,
                    now_closed,
                )

    def _finish(
        self, order: list[tuple[Device, int, int, float]], cycle: float, busiest: float, loaded: int
    ) -> None:
        if self.m not in self.problem.m_choices(len(order)):
            return
        ret = self._hop(order[-1][0], order[0][0], self.layers.ids) if len(order) > 1 else 0.0
        step = max(cycle + ret, self.m * busiest)
        self.visit(step, loaded, tuple((d.ref, a, e) for d, a, e, _ in order))


def _walk_all(problem: Problem, held: frozenset[tuple[str, int, int]], prune: Prune, visit: Visit):
    for m in problem.all_m_choices():
        layers = _Layers(problem, schedule.microbatch_size(problem.batch, m))
        _Walk(problem, layers, m, held, prune, visit).run()


def minimal_moves(problem: Problem, previous: Sequence[Stage], slack: float) -> Reference | None:
    """T* and the fewest bytes within ``(1 + slack)`` x T* given what ``previous`` holds; None
    when no plan fits."""
    held = frozenset((s.device, s.layer_start, s.layer_end) for s in previous)
    best = [math.inf]

    def faster(step: float, _loaded: int, _plan: tuple[tuple[str, int, int], ...]) -> None:
        best[0] = min(best[0], step)

    _walk_all(problem, held, lambda bound, _loaded: bound > best[0] * (1 + REL_TOL), faster)
    if not math.isfinite(best[0]):
        return None
    limit = best[0] * (1.0 + slack) * (1 + REL_TOL)
    fewest: list[tuple[int, tuple[tuple[str, int, int], ...]]] = []

    def lighter(step: float, loaded: int, plan: tuple[tuple[str, int, int], ...]) -> None:
        if step <= limit and (not fewest or loaded < fewest[0][0]):
            fewest[:] = [(loaded, plan)]

    def prune(bound: float, loaded: int) -> bool:
        return bound > limit or (bool(fewest) and loaded >= fewest[0][0])

    _walk_all(problem, held, prune, lighter)
    return Reference(best[0], fewest[0][0], fewest[0][1])
