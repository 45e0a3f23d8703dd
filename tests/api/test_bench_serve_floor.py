"""The serve bench's floor runs the batch as the batcher does (the plan's M lanes, sizes
differing by at most one) and profiles its decode steps per stage."""

from __future__ import annotations

import pytest

from shardplane.bench.serve import Floor, cores_used, cpu_seconds, lanes_of, workload_context


def test_sixteen_prompts_in_two_lanes_are_two_lanes_of_eight() -> None:
    prompts = [[i] for i in range(16)]
    lanes = lanes_of(prompts, 2)
    assert [len(lane) for lane in lanes] == [8, 8]
    assert sorted(p for lane in lanes for p in lane) == prompts


@pytest.mark.parametrize(("batch", "m", "sizes"), [(5, 2, [3, 2]), (1, 1, [1]), (2, 3, [1, 1])])
def test_lanes_differ_by_at_most_one_and_none_is_empty(
    batch: int, m: int, sizes: list[int]
) -> None:
    assert [len(lane) for lane in lanes_of([[i] for i in range(batch)], m)] == sizes


def test_the_profile_is_the_median_per_stage() -> None:
    floor = Floor(16, 2, step_ms=[80.0, 90.0, 200.0])
    floor.stage_ms = [(20.0, 30.0), (22.0, 34.0), (90.0, 31.0)]
    assert floor.step_ms_p50 == 90.0
    assert floor.stage_ms_p50 == (22.0, 31.0)
    assert Floor(1, 1).stage_ms_p50 == ()
    assert Floor(1, 1).step_ms_p50 == 0.0


def test_cores_used_is_cpu_seconds_over_wall_seconds() -> None:
    before = {"bench": 10.0, "serve-a": 3.0, "gone": 1.0}
    after = {"bench": 11.5, "serve-a": 5.0, "new": 9.0}
    assert cores_used(before, after, 2.0) == {"bench": 0.75, "serve-a": 1.0}
    assert cores_used(before, after, 0.0) == {}


def test_cpu_seconds_reads_this_process_and_skips_a_gone_one() -> None:
    import os

    busy = cpu_seconds({"me": os.getpid(), "gone": 2**22 + 7})
    assert set(busy) == {"me"} and busy["me"] > 0


def test_the_plan_is_asked_for_the_context_the_sequences_reach() -> None:
    assert workload_context([4, 9, 6], 32) == 41
    with pytest.raises(ValueError, match="tokens >= 1"):
        workload_context([4], 0)
    with pytest.raises(ValueError, match="need prompts"):
        workload_context([], 3)
