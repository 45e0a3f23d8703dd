"""The pipeline bench's prediction: the host calibrated as the projector calibrates a device,
then the planner's stage-time arithmetic.

Why its own module: the bench must predict with the same code production uses, or a good ratio
would prove nothing. So the in-process floor's decode steps are turned into the ``ShardStatus``
figures a worker would publish (median of a run of steps of one size, with its bytes, rows and
FLOPs: agents.steptiming), folded by ``projector.calibration.calibrate`` into a ``DeviceState``
that describes this host's CPU (vendor ``cpu``: what actually ran, so the host-substitute rule
does not apply), and each case is predicted with ``planner.schedule.stage_ms`` per stage (max of
bytes / measured bandwidth and FLOPs / measured compute) plus one crossing per stage.

After a run, the host is calibrated as in production: from the step reports the stage processes
themselves made (``StepTiming``, what a worker publishes in ``ShardStatus``), so a later plan is
predicted from what stages cut like this really took, not only from the bare forward.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence

from shardplane.agents.pipeline import even_bounds
from shardplane.agents.steptiming import StepTiming
from shardplane.bus.messages import DeviceSample, DeviceState, ShardStatus
from shardplane.planner import schedule
from shardplane.planner.catalog import resolve
from shardplane.projector.calibration import MIN_SAMPLES, calibrate

MODEL = "smollm2-135m"
EVERY = 8  # steps per reported figure, as agents.steptiming reports them


def host_device() -> DeviceState:
    sample = DeviceSample(node="host", index=0, uuid="host-cpu", seq=1, ts=0.0, vendor="cpu")
    return DeviceState(sample=sample, online=True, last_seen=0.0)


def reports(
    step_ms: Sequence[float],
    read_bytes: int,
    rows: int,
    flops: float,
    executor: str = "numpy-cpu",
    device: str = "host/0",
) -> list[ShardStatus]:
    """A worker's step reports for these steps: medians of runs of ``EVERY`` (shorter runs when
    there are too few steps for ``MIN_SAMPLES`` reports, as in --quick)."""
    run = EVERY if len(step_ms) >= EVERY * MIN_SAMPLES else max(1, len(step_ms) // MIN_SAMPLES)
    out: list[ShardStatus] = []
    for i in range(0, len(step_ms) - run + 1, run):
        out.append(
            ShardStatus(
                instance_id="bench",
                generation=1,
                node="host",
                stage=0,
                state="loaded",
                seq=len(out) + 1,
                ts=1.0,
                device=device,
                step_ms=statistics.median(step_ms[i : i + run]),
                step_bytes=read_bytes,
                step_rows=rows,
                step_flops=flops,
                executor=executor,
            )
        )
    return out


def calibrated(floors: dict[int, tuple[list[float], int, float]]) -> tuple[float, float | None]:
    """(GB/s, TFLOPS) of this host from the floor's steps, by batch: (step ms, bytes, FLOPs per
    step). Bandwidth comes from batch 1, compute from the larger batches (None without one)."""
    device = host_device()
    for rows, (ms, nbytes, flops) in sorted(floors.items()):
        for status in reports(ms, nbytes, rows, flops):
            device = calibrate(device, status)
    if device.measured_gbps is None:
        raise ValueError("too few batch-1 steps to calibrate bandwidth (need 3 reports)")
    return device.measured_gbps, device.measured_tflops


def from_steps(timings: Sequence[StepTiming]) -> tuple[float | None, float | None]:
    """(GB/s, TFLOPS) of this host from stage processes' own step reports, folded in the order
    they were made; None for a figure with fewer than ``MIN_SAMPLES`` reports."""
    device = host_device()
    for i, t in enumerate(timings):
        device = calibrate(
            device,
            ShardStatus(
                instance_id="bench", generation=1, node="host", stage=0, state="loaded",
                seq=i + 1, ts=1.0, device="host/0", step_ms=t.ms, step_bytes=t.read_bytes,
                step_rows=t.rows, step_flops=t.flops, executor=t.executor,
            ),
        )  # fmt: skip
    return device.measured_gbps, device.measured_tflops


def predicted_ms(
    stages: int, batch: int, gbps: float, tflops: float | None, hop_ms: float, context: int
) -> float:
    """The planner's step time for SmolLM2 cut evenly into ``stages`` on this host: per stage
    max(read / GB/s, FLOPs / TFLOPS) (planner.schedule.stage_ms), plus one crossing per stage
    (the client's to stage 0 included)."""
    profile = resolve(MODEL)
    reads = profile.read_bytes(batch)
    flops = profile.layer_flops_per_token(context)
    bounds = even_bounds(profile.layers, stages)
    total = 0.0
    for a, e in itertools.pairwise(bounds):
        last = e == profile.layers
        read = sum(reads[a:e]) + profile.end_bytes(False, last)
        work = batch * (sum(flops[a:e]) + (profile.head_flops_per_token if last else 0.0))
        total += schedule.stage_ms(read, work, gbps, tflops or 0.0)
    return total + stages * hop_ms
