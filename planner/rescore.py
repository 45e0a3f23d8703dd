"""A placed plan scored again against what its devices report now.

Why: a placement's reply carries the figures the planner computed when it placed the instance,
from datasheet (or host) figures. Once the workers have run the stages, calibration
(projector.calibration) knows what each device really achieved; the question "what does this
plan predict now" must then be answered for the plan that was PLACED (same devices, same layer
ranges, same batch and M), not for whatever a fresh placement would pick. A re-plan may choose
another split, and its figure says nothing about the instance that is serving.

This is the planner's own arithmetic (planner.fleet turns the KV's device states into planner
devices, planner.cost.evaluate applies the decode schedule), so the figure means what a reply's
``tokens_per_s`` means. Pure: the caller reads the KV.
"""

from __future__ import annotations

from collections.abc import Iterable

from shardplane.bus.messages import DeviceState, NodeState, PlacementReply
from shardplane.planner.cost import Evaluation, Problem, StagePlan, evaluate
from shardplane.planner.fleet import build_fleet
from shardplane.planner.profile import ModelProfile


def rescore(
    reply: PlacementReply,
    profile: ModelProfile,
    devices: Iterable[DeviceState],
    nodes: Iterable[NodeState],
) -> Evaluation:
    """The placed plan of ``reply`` evaluated with the devices' current (calibrated where
    measured) figures, at the reply's batch, context and M.

    The placed devices count as the instance's own (their utilisation is its own work, as when
    the planner re-places it). Memory fit is not judged again: the devices' free memory now
    excludes what the instance itself holds, so ``fits`` would say nothing about this plan.

    Raises ValueError when the reply is not a placed plan, or names a device the state does not
    list as a candidate (offline, lost, excluded), with the reason where there is one.
    """
    if not reply.ok or not reply.stages:
        raise ValueError(f"reply of instance {reply.instance_id!r} holds no placed plan")
    if reply.batch < 1 or reply.microbatches < 1:
        raise ValueError(
            f"reply of instance {reply.instance_id!r} has batch {reply.batch} and "
            f"microbatches {reply.microbatches}; both must be >= 1"
        )
    if reply.stages[-1].layer_end != profile.layers:
        raise ValueError(
            f"the plan ends at layer {reply.stages[-1].layer_end} but the model has "
            f"{profile.layers} layers: not a plan of this model"
        )
    own = frozenset(s.device for s in reply.stages)
    by_node = {n.heartbeat.node: n for n in nodes}
    fleet = build_fleet(devices, by_node, own=own)
    by_ref = {d.ref: d for d in fleet.devices}
    why_not = dict(fleet.excluded)
    stages: list[StagePlan] = []
    for s in reply.stages:
        device = by_ref.get(s.device)
        if device is None:
            reason = why_not.get(s.device, "not in the cluster state")
            raise ValueError(f"placed device {s.device} is not a candidate now: {reason}")
        stages.append(StagePlan(device, s.layer_start, s.layer_end))
    problem = Problem(
        profile=profile,
        fleet=fleet,
        context_tokens=reply.context_tokens,
        batch=reply.batch,
        microbatches=reply.microbatches,
    )
    return evaluate(problem, tuple(stages), microbatches=reply.microbatches)
