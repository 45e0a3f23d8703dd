"""An independent validator: every plan passes it before anything is published.

It re-derives every figure from the model profile and the fleet with its own loops (not the
solvers' prefix tables), so a bug in a solver or in the reply builder cannot vouch for itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardplane.bus.errors import PlannerError
from shardplane.bus.messages import Stage
from shardplane.planner import schedule
from shardplane.planner.cost import WORKSPACE_BYTES, Problem

GIB = 1024**3
REL_TOL = 1e-6


class InvalidPlan(PlannerError, ValueError):
    """A plan that must not be published; ``problems`` lists every violation found."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, abs(a), abs(b)) + 1e-9


def stage_times(
    problem: Problem, stages: Sequence[Stage], micro: int
) -> tuple[list[float], list[float]]:
    """t_s and h_s (the last one the return hop) for micro-batches of ``micro`` sequences,
    layer by layer from the profile: the validator's own arithmetic, which the placement
    benchmark also uses to simulate what a plan delivers."""
    p = problem.profile
    by_ref = {d.ref: d for d in problem.devices}
    reads = p.read_bytes(micro)
    flops = p.layer_flops_per_token(problem.context_tokens)
    ctx = problem.context_tokens
    times: list[float] = []
    hops: list[float] = []
    for i, s in enumerate(stages):
        dev = by_ref[s.device]
        read = 0.0
        work = 0.0
        for layer in range(s.layer_start, s.layer_end):
            read += reads[layer] + p.kv_bytes_per_token[layer] * ctx * micro
            work += flops[layer] * micro
        if s.layer_end == p.layers:
            read += p.head_bytes
            work += p.head_flops_per_token * micro
        times.append(schedule.stage_ms(read, work, dev.bandwidth_gbps, dev.tflops))
        if i + 1 < len(stages):
            nbytes = p.activation_bytes_per_token * micro
            nxt = by_ref[stages[i + 1].device]
        else:  # the return hop: token ids back to the first stage
            nbytes = schedule.TOKEN_ID_BYTES * micro
            nxt = by_ref[stages[0].device]
        if nxt.ref == dev.ref:
            hops.append(0.0)
        else:
            link = problem.fleet.link(dev, nxt)
            hops.append(schedule.link_ms(nbytes, link.gbytes_per_s, link.latency_ms))
    return times, hops


def check(
    problem: Problem,
    stages: Sequence[Stage],
    bottleneck_ms: float | None = None,
    latency_ms: float | None = None,
    *,
    microbatches: int = 1,
    step_ms: float | None = None,
) -> None:
    """Raise InvalidPlan unless ``stages`` cover every layer once, contiguously, in order, on
    distinct candidate devices that have the memory, with figures matching the cost model.

    Each stage's ``stage_ms``/``hop_ms`` must be t_s(B)/h_s(B); at M = ``microbatches``, the
    busiest stage (``bottleneck_ms``), the round trip (``latency_ms``) and the step time
    (``step_ms``) are checked when given, and M must be one the request allows."""
    errors = _structure(problem, stages)
    if not errors:
        times, hops = stage_times(problem, stages, problem.batch)
        for i, s in enumerate(stages):
            if not _close(times[i], s.stage_ms):
                errors.append(
                    f"stage {i}: stage_ms {s.stage_ms:.6f} but the cost model gives {times[i]:.6f}"
                )
            if not _close(hops[i], s.hop_ms):
                errors.append(
                    f"stage {i}: hop_ms {s.hop_ms:.6f} but the cost model gives {hops[i]:.6f}"
                )
        if microbatches not in problem.m_choices(len(stages)):
            errors.append(
                f"{microbatches} micro-batches is not allowed for {len(stages)} stages "
                f"(batch {problem.batch}, microbatches={problem.microbatches!r}, "
                f"min_stages={problem.min_stages}, objective {problem.objective})"
            )
        micro = schedule.microbatch_size(problem.batch, microbatches)
        t_b, h_b = stage_times(problem, stages, micro)
        expected = schedule.step_ms(t_b, h_b, microbatches)
        for name, claimed, value in (
            ("bottleneck_ms", bottleneck_ms, max(t_b)),
            ("round trip", latency_ms, sum(t_b) + sum(h_b)),
            ("step_ms", step_ms, expected),
        ):
            if claimed is not None and not _close(claimed, value):
                errors.append(f"{name} {claimed:.6f} but the stages give {value:.6f}")
    if errors:
        raise InvalidPlan(errors)


def _structure(problem: Problem, stages: Sequence[Stage]) -> list[str]:
    """Coverage, contiguity, distinct candidate devices, memory and bytes."""
    p = problem.profile
    L = p.layers
    errors: list[str] = []
    if not stages:
        return ["plan has no stages"]
    by_ref = {d.ref: d for d in problem.devices}
    expected_start = 0
    seen: set[str] = set()
    if problem.max_stages is not None and len(stages) > problem.max_stages:
        errors.append(f"{len(stages)} stages exceed max_stages={problem.max_stages}")
    if problem.min_stages is not None and len(stages) < problem.min_stages:
        errors.append(f"{len(stages)} stages are fewer than min_stages={problem.min_stages}")
    for i, s in enumerate(stages):
        dev = by_ref.get(s.device)
        if dev is None:
            errors.append(f"stage {i}: device {s.device} is not a candidate device")
            continue
        if s.device in seen:
            errors.append(f"stage {i}: device {s.device} used twice")
        seen.add(s.device)
        if s.node != dev.node:
            errors.append(f"stage {i}: node {s.node} does not own {s.device}")
        if s.layer_start != expected_start:
            errors.append(f"stage {i}: starts at layer {s.layer_start}, expected {expected_start}")
        if s.layer_end <= s.layer_start:
            errors.append(f"stage {i}: empty or reversed range [{s.layer_start}, {s.layer_end})")
            continue
        if s.layer_end > L:
            errors.append(f"stage {i}: ends at layer {s.layer_end} > {L} layers")
            continue
        expected_start = s.layer_end
        first, last = s.layer_start == 0, s.layer_end == L
        weights = 0
        kv = 0
        for layer in range(s.layer_start, s.layer_end):
            weights += p.layer_bytes[layer]
            kv += p.kv_bytes_per_token[layer] * problem.context_tokens * problem.batch
        weights += p.end_bytes(first, last)  # what the worker loads, ends included
        memory = weights + kv + WORKSPACE_BYTES
        usable = problem.usable(dev)
        if memory > usable:
            errors.append(
                f"stage {i}: {s.device} has {usable / GIB:.2f} GiB usable; stage needs {memory / GIB:.2f} GiB"
            )
        if (
            s.weight_bytes != weights
            or s.kv_bytes != kv
            or (s.memory_bytes and s.memory_bytes != memory)
        ):
            errors.append(
                f"stage {i}: bytes differ from the model (weights {s.weight_bytes} vs {weights}, "
                f"kv {s.kv_bytes} vs {kv}, memory {s.memory_bytes} vs {memory})"
            )
        if s.embeddings != first or s.head != last:
            errors.append(f"stage {i}: embeddings/head flags wrong ({s.embeddings}/{s.head})")
        if not _close(s.bandwidth_gbps, dev.bandwidth_gbps):
            errors.append(
                f"stage {i}: bandwidth {s.bandwidth_gbps} GB/s but the device has {dev.bandwidth_gbps}"
            )
    if expected_start != L and not any("ends at" in e or "empty" in e for e in errors):
        errors.append(f"layers [{expected_start}, {L}) are not placed")
    return errors
