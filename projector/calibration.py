"""Per-device calibration: the memory bandwidth and compute a device really achieved running
stages.

Why: the planner's step time is t(b) = max(read / bandwidth, flops / compute) with datasheet
figures; a device that runs slower (a throttled card, a slow kernel, a host CPU) makes every
plan that uses it wrong. Workers time their decode steps by step size (``ShardStatus.step_ms``
with ``step_bytes``, ``step_rows``, ``step_flops``; agents.steptiming), and the projector keeps
per device:

- bandwidth from batch-1 steps (bytes / time): at batch 1 a step reads every weight for one
  token, the bandwidth-bound case. ``DeviceState.measured_gbps``.
- compute from steps of several sequences (FLOPs / time): where a step is compute-bound (a host
  CPU at batch 4), this is the figure that predicts it; where it is still bandwidth-bound (a GPU
  at batch 4) it is a lower bound that, under the max(), still predicts the batches that ran.
  ``DeviceState.measured_tflops``.

Each is the median of the last ``WINDOW`` figures, published once there are ``MIN_SAMPLES``.

Robustness: zero, negative or non-finite figures are dropped outright; the median of a window
ignores up to half of it being outliers, so one wild measurement (a step stalled by a busy
host, a cache-hot one) cannot move the figure, and a lasting change wins within a window.

Host substitutes: a simulated GPU (the demo fleet's "A100"s) runs its stages on the host CPU,
and so would a real GPU node whose stage fell back to numpy. Such a step says nothing about the
GPU: folded in, it would make the device look CPU-slow to every later plan. The rule: a step
whose executor ran on the CPU (``executor`` ending in ``-cpu``) calibrates only a CPU device
(``vendor == "cpu"``, agents.cpu); for any other device it is counted in
``host_substitute_steps`` and kept out of both figures, so the device keeps its datasheet
figures (or what steps really run on it measured). Older workers send no ``executor``: their
steps are taken as run on the device, as before.

Links: a stage that asks the next one reports the crossing (``ShardStatus.hop_ms``), and the
projector keeps, on the sending stage's node, per peer node the median of the recent batch-1
crossings (``NodeState.measured_hop_ms``, the same window, minimum and filtering as above), which
the planner takes as that link's latency (planner.fleet). Why: the planner's default latency is a
network's (0.2 ms), while a crossing also pays NATS, framing and waking two processes (0.8-1.4
ms measured on a 2-core host), so every plan with more stages looked cheaper than it ran. Only
crossings between two nodes are kept: two stages on one node are planned over PCIe or NVLink.
"""

from __future__ import annotations

import math
import statistics

import msgspec

from shardplane.bus.messages import DeviceState, NodeState, ShardStatus

WINDOW = 9
MIN_SAMPLES = 3


def measured_gbps(status: ShardStatus) -> float | None:
    """GB/s that a batch-1 status's step figure implies, None when it carries none or nonsense
    (or when its steps had several sequences: those calibrate compute)."""
    if not status.step_ms or not status.step_bytes or status.step_rows != 1:
        return None
    gbps = status.step_bytes / (status.step_ms / 1000.0) / 1e9
    return gbps if math.isfinite(gbps) and gbps > 0 else None


def measured_tflops(status: ShardStatus) -> float | None:
    """Effective TFLOPS a multi-sequence status's step figure implies, None otherwise."""
    if not status.step_ms or not status.step_flops or status.step_rows < 2:
        return None
    tflops = status.step_flops / (status.step_ms / 1000.0) / 1e12
    return tflops if math.isfinite(tflops) and tflops > 0 else None


def host_substitute(status: ShardStatus, vendor: str) -> bool:
    """Whether the status's steps ran on a host CPU standing in for a device that is not one."""
    ran = status.executor
    return ran is not None and ran.endswith("-cpu") and vendor != "cpu"


def fold(samples: tuple[float, ...], value: float) -> tuple[float, ...]:
    return (*samples, value)[-WINDOW:]


def estimate(samples: tuple[float, ...]) -> float | None:
    return statistics.median(samples) if len(samples) >= MIN_SAMPLES else None


def calibrate(device: DeviceState, status: ShardStatus) -> DeviceState:
    """``device`` with ``status``'s step timing folded in (unchanged when it carries none)."""
    if not status.step_ms:
        return device
    if host_substitute(status, device.sample.vendor):
        return msgspec.structs.replace(
            device, host_substitute_steps=device.host_substitute_steps + 1
        )
    gbps, tflops = measured_gbps(status), measured_tflops(status)
    if gbps is not None:
        samples = fold(device.measured_gbps_samples, gbps)
        device = msgspec.structs.replace(
            device, measured_gbps=estimate(samples), measured_gbps_samples=samples
        )
    if tflops is not None:
        samples = fold(device.measured_tflops_samples, tflops)
        device = msgspec.structs.replace(
            device, measured_tflops=estimate(samples), measured_tflops_samples=samples
        )
    return device


def carried(device: DeviceState, previous: DeviceState | None) -> DeviceState:
    """``device`` (rebuilt from a new sample or a liveness change) with ``previous``'s
    calibration: telemetry does not reset what stages measured."""
    if previous is None:
        return device
    return msgspec.structs.replace(
        device,
        measured_gbps=previous.measured_gbps,
        measured_gbps_samples=previous.measured_gbps_samples,
        measured_tflops=previous.measured_tflops,
        measured_tflops_samples=previous.measured_tflops_samples,
        host_substitute_steps=previous.host_substitute_steps,
    )


def measured_hop(status: ShardStatus) -> float | None:
    """The crossing (ms) a batch-1 status reports to the next stage; None when it carries none
    or nonsense (a step of several sequences carries more bytes than a latency's)."""
    hop = status.hop_ms
    if hop is None or status.step_rows != 1 or not math.isfinite(hop) or hop <= 0:
        return None
    return hop


def calibrate_link(node: NodeState, peer: str, status: ShardStatus) -> NodeState:
    """``node`` with the crossing ``status`` measured to ``peer`` folded in (unchanged when it
    carries none, or when ``peer`` is the node itself)."""
    hop = measured_hop(status)
    if hop is None or peer == node.heartbeat.node:
        return node
    samples = fold(node.measured_hop_samples.get(peer, ()), hop)
    measured = dict(node.measured_hop_ms)
    found = estimate(samples)
    if found is None:
        measured.pop(peer, None)
    else:
        measured[peer] = found
    return msgspec.structs.replace(
        node,
        measured_hop_ms=measured,
        measured_hop_samples={**node.measured_hop_samples, peer: samples},
    )


def carried_links(node: NodeState, previous: NodeState | None) -> NodeState:
    """``node`` (rebuilt from a heartbeat or a liveness change) with ``previous``'s measured
    links: heartbeats do not reset what crossings measured."""
    if previous is None or not previous.measured_hop_samples:
        return node
    return msgspec.structs.replace(
        node,
        measured_hop_ms=previous.measured_hop_ms,
        measured_hop_samples=previous.measured_hop_samples,
    )
