"""The decode schedule: what a plan delivers, as arithmetic every part of the planner shares.

A plan is judged by what users get from it, so the cost model is the decode schedule itself
(DESIGN.md, "Planner model"), not the slowest stage alone. B sequences decode concurrently as
M micro-batches of ``b = ceil(B / M)`` sequences, ``1 <= M <= min(B, S)`` for S stages. A
sequence's next token needs its previous one, so each micro-batch goes round the whole pipeline,
and its sampled token ids back to the first stage, once per step:

    t_s(b) = max(read_s(b) / BW_d, flops_s(b) / FLOPS_d)       stage s on device d
    h_s(b) = b x activation bytes / link + latency              to the next stage
    h_last(b) = b x TOKEN_ID_BYTES / link + latency             the return hop to stage 0
                (0 when the last stage and the first share a device)
    P(M) = max(sum_s (t_s(b) + h_s(b)), M x max_s t_s(b))      the step time
    tokens_per_s = B / P(M)

Why the two terms: the round trip is how long one micro-batch needs for its next token; and
every stage serves the M micro-batches one after another, so no micro-batch comes back sooner
than the busiest stage can serve all of them. Links are pure delays (a hop never queues). The
step time is exact for this FIFO pipeline (tests/planner/test_schedule.py checks it against a
discrete-event simulation).

Everything here is pure and has no knowledge of solvers: the solvers, the validator, the
exhaustive search, the benchmarks and the exports call these functions so that a number in a
reply means the same thing everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

TOKEN_ID_BYTES = 4  # a sampled token id (int32) per sequence on the return hop

# What the request's ``microbatches`` may say besides a number: "auto" lets the planner choose
# M; "stages" means one micro-batch per stage (M = min(B, S)), the schedule vLLM runs.
MicrobatchPolicy = Literal["auto", "stages"]

# Engines run fixed schedules: llama.cpp's pipeline (and its RPC split) carries one batch at a
# time; vLLM keeps one micro-batch per pipeline rank in flight (a virtual engine per rank).
ENGINE_MICROBATCHES: dict[str, int | MicrobatchPolicy] = {"llamacpp": 1, "vllm": "stages"}


def engine_microbatches(engine: str) -> int | MicrobatchPolicy:
    """The request's ``microbatches`` for a plan meant for ``engine`` (see ENGINE_MICROBATCHES)."""
    try:
        return ENGINE_MICROBATCHES[engine]
    except KeyError:
        raise ValueError(
            f"unknown engine {engine!r}; known: {', '.join(sorted(ENGINE_MICROBATCHES))}"
        ) from None


def microbatch_size(batch: int, microbatches: int) -> int:
    """b = ceil(B / M): the last micro-batch may be smaller; the schedule charges every one as
    the largest (no plan claims more than it delivers)."""
    return -(-batch // microbatches)


def microbatch_choices(batch: int, stages: int) -> tuple[int, ...]:
    """Every M worth considering for ``stages`` stages, ascending: 1 <= M <= min(B, S), and of
    the values of M giving the same micro-batch size only the smallest (a larger M with the same
    b only multiplies the busiest stage's share)."""
    top = max(1, min(batch, stages))
    out: list[int] = []
    seen: set[int] = set()
    for m in range(1, top + 1):
        b = microbatch_size(batch, m)
        if b not in seen:
            seen.add(b)
            out.append(m)
    return tuple(out)


def stage_ms(read_bytes: float, flops: float, bandwidth_gbps: float, tflops: float) -> float:
    """t_s: a stage is bound by its memory traffic or its arithmetic, whichever is slower.
    ``tflops`` 0 means unknown, and then only the memory term counts."""
    t = read_bytes / (bandwidth_gbps * 1e6)  # GB/s = 1e6 bytes per ms
    if tflops > 0:
        t = max(t, flops / (tflops * 1e9))  # TFLOPS = 1e9 FLOP per ms
    return t


def link_ms(nbytes: float, gbytes_per_s: float, latency_ms: float) -> float:
    """A hop: transfer time of ``nbytes`` plus the link's latency."""
    return nbytes / (gbytes_per_s * 1e9) * 1e3 + latency_ms


def step_ms(stage: Sequence[float], hop: Sequence[float], microbatches: int) -> float:
    """P(M) from t_s(b) and h_s(b) (``hop[-1]`` is the return hop)."""
    if not stage:
        return 0.0
    return max(math.fsum(stage) + math.fsum(hop), microbatches * max(stage))


def tokens_per_s(batch: int, step: float) -> float:
    """B tokens per step (one per sequence); ``step`` in ms."""
    return batch * 1000.0 / step if step > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Schedule:
    """A plan's schedule at one M: the per-stage figures for micro-batches of ``micro_batch``
    sequences, and what they add up to."""

    batch: int
    microbatches: int
    micro_batch: int
    stage_ms: tuple[float, ...]  # t_s(b)
    hop_ms: tuple[float, ...]  # h_s(b); the last entry is the return hop

    @property
    def cycle_ms(self) -> float:
        """One micro-batch's round trip: sum of t_s(b) + h_s(b)."""
        return math.fsum(self.stage_ms) + math.fsum(self.hop_ms)

    @property
    def busiest_ms(self) -> float:
        """max t_s(b): the busiest stage's time per micro-batch."""
        return max(self.stage_ms, default=0.0)

    @property
    def step_ms(self) -> float:
        return step_ms(self.stage_ms, self.hop_ms, self.microbatches)

    @property
    def tokens_per_s(self) -> float:
        return tokens_per_s(self.batch, self.step_ms)
