"""The validator's rejections, one per rule, each on a plan that is valid but for that one fault.

Every plan a solver returns passes the validator, so only a plan broken on purpose shows that a
rule is checked at all: a rule deleted from ``planner/validate.py`` fails its test here."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from shardplane.bus.messages import Stage
from shardplane.planner import validate
from shardplane.planner.catalog import resolve
from shardplane.planner.cost import Problem
from shardplane.planner.fleet import build_fleet
from shardplane.planner.plan import plan
from shardplane.planner.synthetic import HostSpec, states

# Three 24 GiB cards on two hosts: a 70B model at 4 bits needs all three.
HOSTS = [HostSpec("a", ("RTX-4090", "RTX-4090")), HostSpec("b", ("RTX-4090",))]


def _problem() -> Problem:
    devs, nodes = states(HOSTS)
    return Problem(resolve("llama-3.1-70b-q4"), build_fleet(devs, nodes), 4096, 1)


def _planned() -> tuple[Problem, tuple[Stage, ...]]:
    p = _problem()
    stages = tuple(plan(p).stages)
    assert len(stages) >= 2, "the cases below need a plan of two stages or more"
    validate.check(p, stages)  # the unbroken plan passes
    return p, stages


def _rejected(p: Problem, stages: tuple[Stage, ...]) -> str:
    with pytest.raises(validate.InvalidPlan) as caught:
        validate.check(p, stages)
    return str(caught.value)


def test_a_device_used_twice() -> None:
    p, stages = _planned()
    twice = (
        stages[0],
        msgspec.structs.replace(stages[1], device=stages[0].device, node=stages[0].node),
        *stages[2:],
    )
    assert f"device {stages[0].device} used twice" in _rejected(p, twice)


def test_more_stages_than_the_request_allows() -> None:
    p, stages = _planned()
    capped = dataclasses.replace(p, max_stages=len(stages) - 1)
    assert f"{len(stages)} stages exceed max_stages={len(stages) - 1}" in _rejected(capped, stages)


def test_a_stage_on_a_node_that_does_not_own_its_device() -> None:
    p, stages = _planned()
    other = next(d.node for d in p.devices if d.node != stages[0].node)
    moved = (msgspec.structs.replace(stages[0], node=other), *stages[1:])
    assert f"stage 0: node {other} does not own {stages[0].device}" in _rejected(p, moved)


@pytest.mark.parametrize("flag", ["embeddings", "head"])
def test_embedding_and_head_flags_must_match_the_ends(flag: str) -> None:
    p, stages = _planned()
    middle = 0 if flag == "head" else len(stages) - 1  # the stage that must NOT carry it
    wrong = list(stages)
    wrong[middle] = msgspec.structs.replace(stages[middle], **{flag: True})
    assert f"stage {middle}: embeddings/head flags wrong" in _rejected(p, tuple(wrong))


def test_a_hop_that_is_not_the_cost_models() -> None:
    p, stages = _planned()
    slow = (msgspec.structs.replace(stages[0], hop_ms=stages[0].hop_ms + 5.0), *stages[1:])
    assert "stage 0: hop_ms" in _rejected(p, slow)
    assert "but the cost model gives" in _rejected(p, slow)
