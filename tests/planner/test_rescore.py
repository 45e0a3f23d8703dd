"""planner.rescore: the placed plan (its devices, layer ranges, batch and M) scored with the
devices' current figures, checked against the validator's own layer-by-layer arithmetic."""

from __future__ import annotations

import msgspec
import pytest

from shardplane.bus.messages import DeviceState, NodeState, PlacementReply, Stage
from shardplane.planner import schedule
from shardplane.planner.catalog import resolve
from shardplane.planner.cost import Problem
from shardplane.planner.fleet import build_fleet
from shardplane.planner.profile import ModelProfile
from shardplane.planner.rescore import rescore
from shardplane.planner.synthetic import HostSpec, states
from shardplane.planner.validate import stage_times
from tests import kit

HOSTS = (HostSpec("a", ("RTX-4090",)), HostSpec("b", ("RTX-4090",)))
BATCH, M, CONTEXT = 16, 2, 1024


def profile() -> ModelProfile:
    return resolve("smollm2-135m")


def placed(split: int, layers: int) -> PlacementReply:
    """A reply as the planner would send it for [0, split) on a/0 and [split, layers) on b/0;
    its own figures (zeros here) play no part in the rescoring."""

    def stage(node: str, start: int, end: int) -> Stage:
        return kit.stage(node, start, end, gpu="RTX-4090")

    return PlacementReply(
        ok=True,
        instance_id="i",
        model="smollm2-135m",
        context_tokens=CONTEXT,
        batch=BATCH,
        microbatches=M,
        stages=(stage("a", 0, split), stage("b", split, layers)),
    )


def calibrated(devices: list[DeviceState], gbps: float, tflops: float | None) -> list[DeviceState]:
    return [msgspec.structs.replace(d, measured_gbps=gbps, measured_tflops=tflops) for d in devices]


def expected_step_ms(
    devices: list[DeviceState], nodes: dict[str, NodeState], reply: PlacementReply
) -> float:
    """P(M) from the validator's independent per-layer loops on the same fleet."""
    fleet = build_fleet(devices, nodes, own=frozenset(s.device for s in reply.stages))
    problem = Problem(profile(), fleet, CONTEXT, BATCH, microbatches=M)
    times, hops = stage_times(problem, reply.stages, schedule.microbatch_size(BATCH, M))
    return schedule.step_ms(times, hops, M)


def test_scores_the_placed_split_with_calibrated_figures() -> None:
    devices, nodes = states(HOSTS)
    reply = placed(29, profile().layers)
    slow = calibrated(devices, gbps=10.0, tflops=0.01)  # a host CPU's figures, compute-bound
    ev = rescore(reply, profile(), slow, nodes.values())
    assert [(s.device.ref, s.layer_start, s.layer_end) for s in ev.stages] == [
        ("a/0", 0, 29),
        ("b/0", 29, 30),
    ]
    assert ev.microbatches == M and ev.schedule.batch == BATCH
    assert all(s.device.calibrated and s.device.tflops == 0.01 for s in ev.stages)
    assert ev.step_ms == pytest.approx(expected_step_ms(slow, nodes, reply), rel=1e-9)
    assert ev.tokens_per_s == pytest.approx(BATCH * 1000 / ev.step_ms, rel=1e-9)
    # Compute-bound at 0.01 TFLOPS: 29 layers outweigh one layer and the head (the tied
    # 49,152 x 576 matrix, about eight layers' worth) a few times over.
    assert ev.stage_ms[0] > 3 * ev.stage_ms[1]


def test_the_compute_term_changes_the_figure_and_the_split_matters() -> None:
    devices, nodes = states(HOSTS)
    layers = profile().layers
    bandwidth_only = calibrated(devices, gbps=10.0, tflops=None)
    slow = calibrated(devices, gbps=10.0, tflops=0.01)
    lopsided = rescore(placed(29, layers), profile(), slow, nodes.values())
    # Without a measured compute figure the datasheet TFLOPS of a 4090 keeps it bandwidth-bound.
    assert rescore(placed(29, layers), profile(), bandwidth_only, nodes.values()).tokens_per_s > (
        2 * lopsided.tokens_per_s
    )
    # An even split of the same devices predicts more: a re-plan's figure is not the placed one's.
    assert rescore(placed(15, layers), profile(), slow, nodes.values()).tokens_per_s > (
        1.3 * lopsided.tokens_per_s
    )


def test_a_placed_device_that_is_gone_is_named_with_its_reason() -> None:
    devices, nodes = states(HOSTS)
    offline = [
        msgspec.structs.replace(d, online=False, offline_reason="silent for 30 s")
        if d.sample.node == "b"
        else d
        for d in devices
    ]
    with pytest.raises(
        ValueError, match=r"b/0 is not a candidate now: offline \(silent for 30 s\)"
    ):
        rescore(placed(29, profile().layers), profile(), offline, nodes.values())
    with pytest.raises(ValueError, match="b/0 is not a candidate now: not in the cluster state"):
        rescore(placed(29, profile().layers), profile(), devices[:1], nodes.values())


def test_a_reply_without_a_plan_or_of_another_model_is_refused() -> None:
    devices, nodes = states(HOSTS)
    with pytest.raises(ValueError, match="holds no placed plan"):
        rescore(PlacementReply(ok=False, instance_id="i"), profile(), devices, nodes.values())
    with pytest.raises(ValueError, match="ends at layer 20 but the model has 30 layers"):
        rescore(placed(10, 20), profile(), devices, nodes.values())
