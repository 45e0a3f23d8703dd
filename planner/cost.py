"""The cost model of one plan: per-stage bytes, FLOPs, memory and the decode schedule.

For a stage on device ``d`` holding layers ``[a, e)`` of L, with micro-batches of b sequences
out of a batch of B, at ``context`` tokens:

    read_s(b)   = sum read(l, b) + b x sum kv(l) x context + head_bytes if e == L
                  (read(l, b): the layer's weights; MoE: the experts b tokens are routed to)
    flops_s(b)  = b x (sum flops(l, context) + head_flops if e == L)
    t_s(b), h_s(b), P(M): planner.schedule (the one place that arithmetic lives)

    weights     = sum layer_bytes(l) + embed_bytes if a == 0 + head_bytes if e == L
                  (- tied_bytes if a == 0 and e == L: one stage holds a tied matrix once)
    memory      = weights + sum kv(l) x context x B + WORKSPACE_BYTES
                must be <= free - promised - headroom x total

``weights`` is the stage's ``weight_bytes`` in a plan: exactly the bytes a worker loads for the
stage (agents.loader checks that they are equal). The KV cache is held for all B sequences
whatever M is; each micro-batch reads only its own sequences' cache.

``Tables`` holds prefix sums for one micro-batch size so a stage costs O(1): the solvers ask
thousands of times per request. ``evaluate`` scores a plan at the best M the request allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import accumulate

from shardplane.bus.messages import Objective
from shardplane.planner import schedule
from shardplane.planner.fleet import Device, Fleet
from shardplane.planner.profile import ModelProfile
from shardplane.planner.schedule import MicrobatchPolicy, Schedule

WORKSPACE_BYTES = 512 * 1024**2  # per stage: runtime context, activations, sampling scratch
GIB = 1024**3
MAX_BATCH_CAP = 1_000_000  # max_batch when a stage holds no KV cache at all


@dataclass(frozen=True, slots=True)
class Problem:
    """One placement problem. ``microbatches`` is the request's: a fixed M, "auto" (the
    planner chooses) or "stages" (M = min(B, S)); objective ``latency`` means M = 1."""

    profile: ModelProfile
    fleet: Fleet
    context_tokens: int
    batch: int
    headroom: float = 0.1
    objective: Objective = "throughput"
    max_stages: int | None = None
    microbatches: int | MicrobatchPolicy = "auto"
    min_stages: int | None = None

    @property
    def devices(self) -> tuple[Device, ...]:
        return self.fleet.devices

    @property
    def layers(self) -> int:
        return self.profile.layers

    def usable(self, device: Device) -> int:
        return device.usable_bytes(self.headroom)

    @property
    def stage_limit(self) -> int:
        limit = min(len(self.devices), self.layers)
        return min(limit, self.max_stages) if self.max_stages else limit

    @property
    def stage_floor(self) -> int:
        """The fewest stages a plan may have: ``min_stages``, and a fixed M needs M stages."""
        fixed = self.microbatches if isinstance(self.microbatches, int) else 1
        return max(1, self.min_stages or 1, fixed if self.objective != "latency" else 1)

    def m_choices(self, stages: int) -> tuple[int, ...]:
        """The values of M a plan of ``stages`` stages may run (empty: none is allowed)."""
        if stages < self.stage_floor:
            return ()
        if self.objective == "latency":
            return (1,)
        m = self.microbatches
        if m == "auto":
            return schedule.microbatch_choices(self.batch, stages)
        if m == "stages":
            return (max(1, min(self.batch, stages)),)
        return (m,) if m <= min(self.batch, stages) else ()

    def all_m_choices(self) -> tuple[int, ...]:
        """Every M some plan of this problem may run."""
        found: set[int] = set()
        for s in range(self.stage_floor, self.stage_limit + 1):
            found.update(self.m_choices(s))
        return tuple(sorted(found))


class Tables:
    """Prefix sums of one problem for micro-batches of ``micro`` sequences (default the whole
    batch), computed once; :meth:`micro_tables` gives (and caches) other micro-batch sizes."""

    def __init__(self, problem: Problem, micro: int | None = None) -> None:
        p = problem.profile
        b = problem.batch if micro is None else micro
        self.problem = problem
        self.micro = b
        self.L = problem.layers
        ctx = problem.context_tokens
        self.W = [0, *accumulate(p.layer_bytes)]
        self.K = [0, *accumulate(k * ctx * problem.batch for k in p.kv_bytes_per_token)]
        reads = p.read_bytes(b)
        self.R = [
            0,
            *accumulate(r + k * ctx * b for r, k in zip(reads, p.kv_bytes_per_token, strict=True)),
        ]
        flops = p.layer_flops_per_token(ctx)
        self.F = [0.0, *accumulate(f * b for f in flops)]
        self.embed = p.embed_bytes
        self.head = p.head_bytes
        self.head_flops = p.head_flops_per_token * b
        self.tied = p.tied_bytes
        self.hop_bytes = p.activation_bytes_per_token * b
        self.return_bytes = schedule.TOKEN_ID_BYTES * b
        self._hops: dict[tuple[str, str], float] = {}
        self._micro: dict[int, Tables] = {b: self}
        # Equal layers (every catalog card) let the packers count layers with one division.
        self.uniform = (
            len(set(p.layer_bytes)) == 1
            and len(set(reads)) == 1
            and len(set(p.kv_bytes_per_token)) == 1
        )
        self.layer_read = self.R[1]
        self.layer_flops = self.F[1]
        self.layer_mem = self.W[1] + self.K[1]

    def micro_tables(self, micro: int) -> Tables:
        found = self._micro.get(micro)
        if found is None:
            found = Tables(self.problem, micro)
            found._micro = self._micro
            self._micro[micro] = found
        return found

    def for_m(self, m: int) -> Tables:
        return self.micro_tables(schedule.microbatch_size(self.problem.batch, m))

    def hop(self, a: Device, b: Device) -> float:
        """h(b) from a to b, memoised (links are looked up by name)."""
        key = (a.ref, b.ref)
        value = self._hops.get(key)
        if value is None:
            link = self.problem.fleet.link(a, b)
            value = schedule.link_ms(self.hop_bytes, link.gbytes_per_s, link.latency_ms)
            self._hops[key] = value
        return value

    def return_hop(self, last: Device, first: Device) -> float:
        """The sampled token ids from the last stage back to the first (0 on one device)."""
        if last.ref == first.ref:
            return 0.0
        link = self.problem.fleet.link(last, first)
        return schedule.link_ms(self.return_bytes, link.gbytes_per_s, link.latency_ms)

    def weights(self, a: int, b: int) -> int:
        """Weight bytes of the stage [a, b): its layers, the embeddings if first, the final norm
        and head if last, a tied matrix once (ModelProfile.end_bytes, inlined: hot path)."""
        first, last = a == 0, b == self.L
        return (
            self.W[b]
            - self.W[a]
            + (self.embed if first else 0)
            + (self.head if last else 0)
            - (self.tied if first and last else 0)
        )

    def memory(self, a: int, b: int) -> int:
        """weights(a, b) + KV for the whole batch + workspace, written out (hot path)."""
        held = self.W[b] - self.W[a] + self.K[b] - self.K[a] + WORKSPACE_BYTES
        if a == 0:
            held += self.embed
        if b == self.L:
            held += self.head - (self.tied if a == 0 else 0)
        return held

    def read(self, a: int, b: int) -> int:
        return self.R[b] - self.R[a] + (self.head if b == self.L else 0)

    def flops(self, a: int, b: int) -> float:
        return self.F[b] - self.F[a] + (self.head_flops if b == self.L else 0.0)

    def stage_ms(self, device: Device, a: int, b: int) -> float:
        return schedule.stage_ms(
            self.read(a, b), self.flops(a, b), device.bandwidth_gbps, device.tflops
        )

    def per_layer_ms(self, device: Device) -> float:
        """Time of one (uniform) layer on ``device``: t_s is linear in the layer count."""
        return schedule.stage_ms(
            self.layer_read, self.layer_flops, device.bandwidth_gbps, device.tflops
        )


@dataclass(frozen=True, slots=True)
class StagePlan:
    device: Device
    layer_start: int
    layer_end: int


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A plan scored at one M: ``schedule`` holds t_s(b) and h_s(b); ``allowed`` is False when
    the request admits no M for this many stages (or fewer stages than ``min_stages``)."""

    stages: tuple[StagePlan, ...]
    schedule: Schedule
    memory: tuple[int, ...]
    weight_bytes: tuple[int, ...]
    kv_bytes: tuple[int, ...]
    fits: bool  # every stage within its device's usable memory
    allowed: bool = True
    nodes: int = field(default=0)

    @property
    def ok(self) -> bool:
        return self.fits and self.allowed

    @property
    def microbatches(self) -> int:
        return self.schedule.microbatches

    @property
    def stage_ms(self) -> tuple[float, ...]:
        return self.schedule.stage_ms

    @property
    def hop_ms(self) -> tuple[float, ...]:
        return self.schedule.hop_ms

    @property
    def step_ms(self) -> float:
        return self.schedule.step_ms if self.allowed else math.inf

    @property
    def bottleneck_ms(self) -> float:
        return self.schedule.busiest_ms

    @property
    def latency_ms(self) -> float:
        return self.schedule.cycle_ms

    @property
    def tokens_per_s(self) -> float:
        return self.schedule.tokens_per_s

    @property
    def key(self) -> tuple[float, int, int]:
        """What the planner minimises: the step time, then fewer stages, then fewer nodes."""
        return (self.step_ms, len(self.stages), self.nodes)


def schedule_of(
    problem: Problem, stages: tuple[StagePlan, ...], m: int, tables: Tables | None = None
) -> Schedule:
    """t_s(b) and h_s(b) of ``stages`` at M = ``m`` (b = ceil(B / m))."""
    t = (tables or Tables(problem)).for_m(m)
    stage_ms = tuple(t.stage_ms(s.device, s.layer_start, s.layer_end) for s in stages)
    hops = [t.hop(s.device, stages[i + 1].device) for i, s in enumerate(stages[:-1])]
    if stages:
        hops.append(t.return_hop(stages[-1].device, stages[0].device))
    return Schedule(problem.batch, m, t.micro, stage_ms, tuple(hops))


def evaluate(
    problem: Problem,
    stages: tuple[StagePlan, ...],
    tables: Tables | None = None,
    microbatches: int | None = None,
) -> Evaluation:
    """A plan's figures at ``microbatches`` or, when None, at the best M the request allows for
    its stage count (ties: the smaller M). No validity checks beyond memory and M."""
    t = tables or Tables(problem)
    memory = tuple(t.memory(s.layer_start, s.layer_end) for s in stages)
    fits = all(mem <= problem.usable(s.device) for mem, s in zip(memory, stages, strict=True))
    choices = (microbatches,) if microbatches is not None else problem.m_choices(len(stages))
    # A plan with more stages than max_stages (or fewer than min_stages) is not one the request
    # admits, however fast: packers that split freely must not hand such a plan on.
    allowed = (
        bool(choices)
        and (microbatches is None or microbatches in problem.m_choices(len(stages)))
        and problem.stage_floor <= len(stages) <= problem.stage_limit
    )
    best: Schedule | None = None
    for m in choices or (1,):
        sch = schedule_of(problem, stages, m, t)
        if best is None or sch.step_ms < best.step_ms * (1 - 1e-12):
            best = sch
    assert best is not None
    return Evaluation(
        stages=stages,
        schedule=best,
        memory=memory,
        weight_bytes=tuple(t.weights(s.layer_start, s.layer_end) for s in stages),
        kv_bytes=tuple(t.K[s.layer_end] - t.K[s.layer_start] for s in stages),
        fits=fits,
        allowed=allowed,
        nodes=len({s.device.node for s in stages}),
    )


def max_batch(problem: Problem, stages: tuple[StagePlan, ...], tables: Tables | None = None) -> int:
    """The most sequences at ``context_tokens`` the placed memory holds: each stage's usable
    memory less its weights and workspace, over its KV cache per sequence."""
    t = tables or Tables(problem)
    best = MAX_BATCH_CAP
    for s in stages:
        per_seq = (t.K[s.layer_end] - t.K[s.layer_start]) // problem.batch
        room = problem.usable(s.device) - t.weights(s.layer_start, s.layer_end) - WORKSPACE_BYTES
        if per_seq > 0:
            best = min(best, max(0, room) // per_seq)
    return best


def stages_from_counts(
    devices: list[Device] | tuple[Device, ...], counts: list[int] | tuple[int, ...]
) -> tuple[StagePlan, ...]:
    """Contiguous stages from per-device layer counts in pipeline order (zero counts dropped)."""
    out: list[StagePlan] = []
    start = 0
    for d, n in zip(devices, counts, strict=True):
        if n > 0:
            out.append(StagePlan(d, start, start + n))
            start += n
    return tuple(out)


def fluid_bound_ms(problem: Problem, m: int, tables: Tables | None = None) -> float:
    """A lower bound on P(m) for any plan: the busiest stage carries at least its share of the
    total work spread over every candidate as a fluid (m x that), and one micro-batch's round
    trip at least the whole work on the fastest device."""
    devs = problem.devices
    if not devs:
        return 0.0
    t = (tables or Tables(problem)).for_m(m)
    read, flops = t.read(0, t.L), t.flops(0, t.L)
    # A device of unknown TFLOPS has no compute term, so the FLOPs bound holds only when every
    # device has one. Each term is a bound on its own (t_s is at least each of them).
    known = all(d.tflops > 0 for d in devs)
    share = read / (sum(d.bandwidth_gbps for d in devs) * 1e6)
    alone = read / (max(d.bandwidth_gbps for d in devs) * 1e6)
    if known:
        share = max(share, flops / (sum(d.tflops for d in devs) * 1e9))
        alone = max(alone, flops / (max(d.tflops for d in devs) * 1e9))
    return max(m * share, alone)


def lower_bound_ms(problem: Problem, tables: Tables | None = None) -> float:
    """The fluid bound on the step time over every M the request allows (the reply's
    ``lower_bound_ms``)."""
    t = tables or Tables(problem)
    choices = problem.all_m_choices()
    if not problem.devices or not choices:
        return 0.0
    return min(fluid_bound_ms(problem, m, t) for m in choices)
