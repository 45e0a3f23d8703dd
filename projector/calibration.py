"""Per-device calibration: the memory bandwidth a device really achieved running stages.

Why: the planner's step times are bytes / bandwidth with a datasheet bandwidth; a device that
runs slower (a simulated GPU computing on a host CPU, a throttled card, a slow kernel) makes
every plan that uses it wrong. Workers time their stage steps (``ShardStatus.step_ms`` with
``step_bytes``); the projector keeps the last ``WINDOW`` figures per device and publishes their
median as ``DeviceState.measured_gbps`` once there are ``MIN_SAMPLES``, and the planner plans
with it (``Stage.calibrated``).

Robustness: zero, negative or non-finite figures are dropped outright; the median of a window
ignores up to half of it being outliers, so one wild measurement (a step stalled by a busy
host, a cache-hot one) cannot move the figure, and a lasting change wins within a window.
"""

from __future__ import annotations

import math
import statistics

from shardplane.bus.messages import ShardStatus

WINDOW = 9
MIN_SAMPLES = 3


def measured_gbps(status: ShardStatus) -> float | None:
    """GB/s that a status's step figure implies, None when it carries none or nonsense."""
    if not status.step_ms or not status.step_bytes:
        return None
    gbps = status.step_bytes / (status.step_ms / 1000.0) / 1e9
    return gbps if math.isfinite(gbps) and gbps > 0 else None


def fold(samples: tuple[float, ...], gbps: float) -> tuple[float, ...]:
    return (*samples, gbps)[-WINDOW:]


def estimate(samples: tuple[float, ...]) -> float | None:
    return statistics.median(samples) if len(samples) >= MIN_SAMPLES else None
