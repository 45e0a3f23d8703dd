"""Step timings a stage reports for calibration: compute time, bytes read, rows and FLOPs.

Why rows and FLOPs and not only bytes: a decode step's time is max(bytes / bandwidth,
FLOPs / compute) (planner.schedule). At batch 1 a step reads every weight once for one token and
is bandwidth-bound on a GPU, but on a host CPU, or at batch 4, it can be compute-bound; a
calibration that learns only bandwidth then predicts batch 4 as fast as batch 1 (the pipeline
bench measured 0.34-0.43 of the real step time that way). So a stage groups its decode steps by
rows (sequences in the step), and after ``EVERY`` steps of one size reports their median time
with the bytes and FLOPs such a step costs; the projector fits bandwidth from batch-1 steps and
compute from larger ones (``projector.calibration``).

FLOPs are counted as the planner's profile counts them (``planner.profile``): 2 per weight a
row multiplies (head included on the last stage) plus attention over the context (Q.K and A.V,
4 x heads x head_dim per cached position per layer).

A stage that asks a next one also reports the crossing to it (``hop_ms``: request to reply,
less what downstream reported as its compute and crossings), the median over the same steps:
the projector turns it into that link's latency for the planner (``projector.calibration``),
which otherwise plans a crossing at a network's figure and misses the software's share of it.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from shardplane.agents.executor import Entry, StageBackend

EVERY = 8  # decode steps of one size between two reports
MAX_ROWS = 64  # larger steps are prefill-like and not reported


@dataclass(frozen=True)
class StepTiming:
    """The median of ``EVERY`` decode steps of ``rows`` sequences."""

    ms: float
    read_bytes: int
    rows: int
    flops: float
    executor: str
    hop_ms: float | None = None  # to the next stage; None on the last one


def step_flops(
    backend: StageBackend, entries: Sequence[Entry], read_bytes: int | None = None
) -> float:
    """FLOPs of one step of ``entries`` through ``backend``'s layers (and head when last);
    ``read_bytes`` is ``backend.read_bytes()`` when the caller has it."""
    c = backend.config
    params = (backend.read_bytes() if read_bytes is None else read_bytes) / 4  # fp32 weights
    layers = backend.layer_end - backend.layer_start
    attn = 4.0 * c.heads * c.head_dim * layers
    rows = sum(e.count for e in entries)
    context = sum(e.start + e.count for e in entries)
    return 2.0 * params * rows + attn * context


@dataclass
class StepTimer:
    """Collects a stage's decode step times per step size; ``add`` returns a report when one
    size has ``EVERY`` of them."""

    every: int = EVERY
    _ms: dict[int, list[float]] = field(default_factory=lambda: {})
    _flops: dict[int, list[float]] = field(default_factory=lambda: {})
    _hops: dict[int, list[float]] = field(default_factory=lambda: {})
    _read: int | None = None  # the backend's read_bytes(): fixed once it is built

    def add_hop(self, entries: Sequence[Entry], ms: float) -> None:
        """A step's crossing to the next stage, reported with the next report of its size."""
        rows = _decode_rows(entries)
        if rows is not None:
            hops = self._hops.setdefault(rows, [])
            hops.append(ms)
            del hops[: -self.every]  # the latest: a last stage never reports, so never clears

    def add(self, backend: StageBackend, entries: Sequence[Entry], ms: float) -> StepTiming | None:
        rows = _decode_rows(entries)
        if rows is None:
            return None  # prefill: its time is not what a decode step costs
        times = self._ms.setdefault(rows, [])
        flops = self._flops.setdefault(rows, [])
        if self._read is None:
            self._read = backend.read_bytes()
        times.append(ms)
        flops.append(step_flops(backend, entries, self._read))
        if len(times) < self.every:
            return None
        report = StepTiming(
            ms=statistics.median(times),
            read_bytes=self._read,
            rows=rows,
            flops=statistics.median(flops),
            executor=backend.name,
        )
        hops = self._hops.pop(rows, [])
        if hops:
            report = dataclasses.replace(report, hop_ms=statistics.median(hops))
        times.clear()
        flops.clear()
        return report


def _decode_rows(entries: Sequence[Entry]) -> int | None:
    """Rows of a decode step (one new token per sequence, not too many); None otherwise."""
    rows = sum(e.count for e in entries)
    if any(e.count != 1 for e in entries) or rows > MAX_ROWS:
        return None
    return rows
