"""An independent validator: every plan passes it before anything is published.

It re-derives every figure from the model profile and the fleet with its own loops (not the
solvers' prefix tables), so a bug in a solver or in the reply builder cannot vouch for itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardplane.bus.messages import Stage
from shardplane.planner.cost import WORKSPACE_BYTES, Problem

GIB = 1024**3
REL_TOL = 1e-6


class InvalidPlan(ValueError):
    """A plan that must not be published; ``problems`` lists every violation found."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, abs(a), abs(b)) + 1e-9


def check(
    problem: Problem, stages: Sequence[Stage], bottleneck_ms: float, latency_ms: float | None = None
) -> None:
    """Raise InvalidPlan unless ``stages`` cover every layer once, contiguously, in order, on
    distinct candidate devices that have the memory, with figures matching the cost model."""
    p = problem.profile
    L = p.layers
    errors: list[str] = []
    if not stages:
        raise InvalidPlan(["plan has no stages"])
    by_ref = {d.ref: d for d in problem.devices}
    expected_start = 0
    seen: set[str] = set()
    reads = p.read_bytes(problem.batch)
    per_stage: list[float] = []
    if problem.max_stages is not None and len(stages) > problem.max_stages:
        errors.append(f"{len(stages)} stages exceed max_stages={problem.max_stages}")
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
        read = 0
        for layer in range(s.layer_start, s.layer_end):
            weights += p.layer_bytes[layer]
            kv += p.kv_bytes_per_token[layer] * problem.context_tokens * problem.batch
            read += reads[layer]
        weights += p.end_bytes(first, last)  # what the worker loads, ends included
        memory = weights + kv + WORKSPACE_BYTES
        read += kv + (p.head_bytes if last else 0)
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
        stage_ms = read / (dev.bandwidth_gbps * 1e9) * 1e3
        if not _close(stage_ms, s.stage_ms) or not _close(s.bandwidth_gbps, dev.bandwidth_gbps):
            errors.append(
                f"stage {i}: stage_ms {s.stage_ms:.6f} but the cost model gives {stage_ms:.6f}"
            )
        if i + 1 < len(stages) and (nxt := by_ref.get(stages[i + 1].device)) is not None:
            link = problem.fleet.link(dev, nxt)
            hop = problem.hop_bytes / (link.gbytes_per_s * 1e9) * 1e3 + link.latency_ms
        else:
            hop = 0.0
        if not _close(hop, s.hop_ms):
            errors.append(f"stage {i}: hop_ms {s.hop_ms:.6f} but the cost model gives {hop:.6f}")
        per_stage.append(stage_ms + hop)
    if expected_start != L and not any("ends at" in e or "empty" in e for e in errors):
        errors.append(f"layers [{expected_start}, {L}) are not placed")
    if per_stage and not errors:
        if not _close(max(per_stage), bottleneck_ms):
            errors.append(
                f"bottleneck_ms {bottleneck_ms:.6f} but the stages give {max(per_stage):.6f}"
            )
        if latency_ms is not None and not _close(sum(per_stage), latency_ms):
            errors.append(f"latency {latency_ms:.6f} but the stages give {sum(per_stage):.6f}")
    if errors:
        raise InvalidPlan(errors)
