"""The cost model: pure arithmetic that every solver, the validator and any client share.

Decode is memory-bandwidth bound. For a stage on device ``d`` holding layers ``[a, b)``:

    read_bytes  = sum_{l∈[a,b)} read(l)                 weights read per decode step (MoE: routed
                                                      experts only, see ModelProfile.read_bytes)
                + sum_{l∈[a,b)} kv(l) x context x batch  the KV cache each sequence reads
                + head_bytes  if b == L                the output head reads its whole matrix
    stage_ms    = read_bytes / (bandwidth_gbps x 1e9) x 1e3
    hop_ms      = activation_bytes x batch / link_bytes_per_s x 1e3 + link_latency_ms
                  (to the next stage; 0 after the last stage)

    weights     = sum layer_bytes(l) + embed_bytes if a == 0 + head_bytes if b == L
                  (- tied_bytes if a == 0 and b == L: one stage holds a tied matrix once)
    memory      = weights + sum kv(l) x context x batch + WORKSPACE_BYTES
                must be <= free - promised - headroom x total

``weights`` is the stage's ``weight_bytes`` in a plan: exactly the bytes a worker loads for the
stage (agents.loader checks that they are equal).

``bandwidth_gbps`` is the device's effective bandwidth (peak derated by utilisation and power
throttling, see planner.fleet). One decode step moves ``batch`` tokens through every stage, so
for throughput the pipeline runs at ``bottleneck_ms = max(stage_ms + hop_ms)`` per step,
``tokens_per_s = batch x 1000 / bottleneck_ms``; for latency a token takes
``sum(stage_ms + hop_ms)``. The embedding lookup reads one row per token and is left out of
``read_bytes``; the sampled token's trip back to stage 0 is a few bytes and is left out too.

``lower_bound_ms`` (the fluid bound) spreads the total work over all candidate devices as if it
were a fluid: total read bytes / sum bandwidth, which no real split beats (throughput). For the
latency objective the bound is total read bytes / the fastest device's bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from shardplane.planner.fleet import Device, Fleet
from shardplane.planner.profile import ModelProfile

WORKSPACE_BYTES = 512 * 1024**2  # per stage: runtime context, activations, sampling scratch
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Problem:
    """One placement problem, with prefix sums so a stage's bytes cost O(1)."""

    profile: ModelProfile
    fleet: Fleet
    context_tokens: int
    batch: int
    headroom: float = 0.1
    objective: str = "throughput"
    max_stages: int | None = None

    @property
    def devices(self) -> tuple[Device, ...]:
        return self.fleet.devices

    @property
    def layers(self) -> int:
        return self.profile.layers

    @property
    def kv_tokens(self) -> int:
        return self.context_tokens * self.batch

    def prefix_weights(self) -> list[int]:
        return [0, *accumulate(self.profile.layer_bytes)]

    def prefix_reads(self) -> list[int]:
        return [0, *accumulate(self.profile.read_bytes(self.batch))]

    def prefix_kv(self) -> list[int]:
        return [0, *accumulate(k * self.kv_tokens for k in self.profile.kv_bytes_per_token)]

    def usable(self, device: Device) -> int:
        return device.usable_bytes(self.headroom)

    @property
    def hop_bytes(self) -> int:
        return self.profile.activation_bytes_per_token * self.batch

    def hop_ms(self, a: Device, b: Device) -> float:
        return self.fleet.link(a, b).hop_ms(self.hop_bytes)

    @property
    def stage_limit(self) -> int:
        limit = min(len(self.devices), self.layers)
        return min(limit, self.max_stages) if self.max_stages else limit


class Tables:
    """Prefix sums of one problem, computed once (every solver asks thousands of times)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.L = problem.layers
        self.W = problem.prefix_weights()
        self.R = problem.prefix_reads()
        self.K = problem.prefix_kv()
        self.embed = problem.profile.embed_bytes
        self.head = problem.profile.head_bytes
        self.tied = problem.profile.tied_bytes
        self.hop_bytes = problem.hop_bytes
        self._hops: dict[tuple[str, str], float] = {}
        # Equal layers (every catalog card) let the packer count layers with one division.
        p = problem.profile
        reads = p.read_bytes(problem.batch)
        self.uniform = (
            len(set(p.layer_bytes)) == 1
            and len(set(reads)) == 1
            and len(set(p.kv_bytes_per_token)) == 1
        )
        self.layer_read = reads[0] + p.kv_bytes_per_token[0] * problem.kv_tokens
        self.layer_mem = p.layer_bytes[0] + p.kv_bytes_per_token[0] * problem.kv_tokens

    def hop(self, a: Device, b: Device) -> float:
        """hop_ms from a to b, memoised (links are looked up by name)."""
        key = (a.ref, b.ref)
        value = self._hops.get(key)
        if value is None:
            value = self.problem.fleet.link(a, b).hop_ms(self.hop_bytes)
            self._hops[key] = value
        return value

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
        """weights(a, b) + KV + workspace, written out: the packers call it thousands of times
        per request, and a nested call costs a third more."""
        held = self.W[b] - self.W[a] + self.K[b] - self.K[a] + WORKSPACE_BYTES
        if a == 0:
            held += self.embed
        if b == self.L:
            held += self.head - (self.tied if a == 0 else 0)
        return held

    def read(self, a: int, b: int) -> int:
        return self.R[b] - self.R[a] + self.K[b] - self.K[a] + (self.head if b == self.L else 0)

    def stage_ms(self, device: Device, a: int, b: int) -> float:
        return self.read(a, b) / (device.bandwidth_gbps * 1e9) * 1e3


@dataclass(frozen=True, slots=True)
class StagePlan:
    device: Device
    layer_start: int
    layer_end: int


@dataclass(frozen=True, slots=True)
class Evaluation:
    stages: tuple[StagePlan, ...]
    stage_ms: tuple[float, ...]
    hop_ms: tuple[float, ...]
    memory: tuple[int, ...]
    weight_bytes: tuple[int, ...]
    kv_bytes: tuple[int, ...]
    bottleneck_ms: float
    latency_ms: float
    fits: bool  # every stage within its device's usable memory

    def value(self, objective: str) -> float:
        return self.latency_ms if objective == "latency" else self.bottleneck_ms

    @property
    def nodes(self) -> int:
        return len({s.device.node for s in self.stages})


def evaluate(
    problem: Problem, stages: tuple[StagePlan, ...], tables: Tables | None = None
) -> Evaluation:
    """Figures of a plan under the cost model (no validity checks beyond the memory fit)."""
    t = tables or Tables(problem)
    stage_ms: list[float] = []
    hops: list[float] = []
    memory: list[int] = []
    weights: list[int] = []
    kvs: list[int] = []
    fits = True
    for i, s in enumerate(stages):
        a, b = s.layer_start, s.layer_end
        stage_ms.append(t.stage_ms(s.device, a, b))
        hops.append(t.hop(s.device, stages[i + 1].device) if i + 1 < len(stages) else 0.0)
        mem = t.memory(a, b)
        memory.append(mem)
        weights.append(t.weights(a, b))
        kvs.append(t.K[b] - t.K[a])
        fits = fits and mem <= problem.usable(s.device)
    per = [x + h for x, h in zip(stage_ms, hops, strict=True)]
    return Evaluation(
        stages=stages,
        stage_ms=tuple(stage_ms),
        hop_ms=tuple(hops),
        memory=tuple(memory),
        weight_bytes=tuple(weights),
        kv_bytes=tuple(kvs),
        bottleneck_ms=max(per) if per else 0.0,
        latency_ms=sum(per),
        fits=fits,
    )


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


def lower_bound_ms(problem: Problem) -> float:
    """The fluid bound (see the module docstring)."""
    if not problem.devices:
        return 0.0
    t = Tables(problem)
    total = t.read(0, problem.layers)
    if problem.objective == "latency":
        return total / (max(d.bandwidth_gbps for d in problem.devices) * 1e9) * 1e3
    return total / (sum(d.bandwidth_gbps for d in problem.devices) * 1e9) * 1e3
