"""Continuous batching's bookkeeping (api.batching): joining, leaving, the micro-batch split,
chunked prompts riding along with decodes, deferred releases, and the queue bound."""

from __future__ import annotations

import pytest

from shardplane.api.batching import Batch, QueueFull, Sampled, Seq, Step


def seq(rid: str, prompt: int = 3, max_tokens: int = 4, stop: frozenset[int] = frozenset()) -> Seq:
    return Seq(rid, tuple(range(10, 10 + prompt)), max_tokens, stop)


def run(batch: Batch, lane: int, token: int = 7) -> tuple[Step, list[Sampled], list[str]]:
    step = batch.next_step(lane)
    assert step is not None
    sampled, release = batch.finished(step, [token] * len(step.work))
    return step, sampled, release


def test_requests_join_up_to_the_batch_then_queue_then_refuse() -> None:
    batch = Batch(capacity=4, microbatches=2, queue_limit=2)
    assert all(batch.submit(seq(f"r{i}")) for i in range(4))
    assert not batch.submit(seq("q0"))
    assert not batch.submit(seq("q1"))
    with pytest.raises(QueueFull, match="all 4 batch slots are busy"):
        batch.submit(seq("q2"))
    assert [s.rid for s in batch.queue] == ["q0", "q1"]


def test_the_batch_splits_evenly_into_the_plans_micro_batches() -> None:
    batch = Batch(capacity=6, microbatches=3, queue_limit=0)
    for i in range(6):
        batch.submit(seq(f"r{i}"))
    assert batch.lane_sizes() == [2, 2, 2]
    # A freed slot is taken in the lane that lost it (the fewest members).
    batch.leave("r4")
    batch.submit(seq("n"))
    assert batch.running["n"].lane == batch.running["r1"].lane
    assert batch.lane_sizes() == [2, 2, 2]


def test_m_never_exceeds_the_batch() -> None:
    assert Batch(capacity=2, microbatches=4, queue_limit=0).microbatches == 2
    with pytest.raises(ValueError, match="capacity >= 1"):
        Batch(capacity=0, microbatches=1, queue_limit=0)


def test_a_prompt_goes_in_chunks_beside_the_running_decodes() -> None:
    batch = Batch(capacity=2, microbatches=1, queue_limit=0, prefill_chunk=4)
    batch.submit(seq("a", prompt=2))
    step, sampled, _ = run(batch, 0, token=100)
    assert step.work[0].tokens == (10, 11) and step.work[0].samples
    assert sampled == [Sampled("a", 100, False)]
    # b joins with a 10-token prompt: a keeps decoding, one chunk of b rides along each step.
    batch.submit(seq("b", prompt=10))
    seen: list[tuple[tuple[int, int, bool], ...]] = []
    for _ in range(3):
        step = batch.next_step(0)
        assert step is not None
        seen.append(tuple((w.start, len(w.tokens), w.samples) for w in step.work))
        batch.finished(step, [101] * len(step.work))
    assert seen == [
        ((2, 1, True), (0, 4, False)),
        ((3, 1, True), (4, 4, False)),
        ((4, 1, True), (8, 2, True)),
    ]
    b = batch.running["b"]
    assert b.fed == 10 and b.produced == 1 and b.position == 10


def test_positions_follow_the_prompt_then_one_per_token() -> None:
    batch = Batch(capacity=1, microbatches=1, queue_limit=0)
    batch.submit(seq("a", prompt=3, max_tokens=3))
    starts: list[int] = []
    done: list[bool] = []
    for token in (5, 6, 7):
        step, sampled, _ = run(batch, 0, token)
        starts.append(step.work[0].start)
        done.append(sampled[0].done)
    assert starts == [0, 3, 4]
    assert done == [False, False, True]
    assert "a" not in batch.running


def test_a_finished_sequence_frees_its_slot_and_releases_its_caches() -> None:
    batch = Batch(capacity=1, microbatches=1, queue_limit=1)
    batch.submit(seq("a", max_tokens=1))
    assert not batch.submit(seq("b"))
    _, sampled, release = run(batch, 0)
    assert sampled == [Sampled("a", 7, True)] and release == ["a"]
    joined = batch.promote()
    assert [s.rid for s in joined] == ["b"] and not batch.queue


def test_a_stop_token_ends_the_sequence() -> None:
    batch = Batch(capacity=1, microbatches=1, queue_limit=0)
    batch.submit(seq("a", max_tokens=50, stop=frozenset({2})))
    _, sampled, release = run(batch, 0, token=2)
    assert sampled[0].done and release == ["a"]


def test_leaving_mid_step_defers_the_release_until_the_step_is_back() -> None:
    batch = Batch(capacity=2, microbatches=1, queue_limit=1)
    batch.submit(seq("a"))
    batch.submit(seq("b"))
    assert not batch.submit(seq("c"))
    step = batch.next_step(0)
    assert step is not None
    release, joined = batch.leave("a")
    assert release == []  # a stage may not have seen the step yet
    assert [s.rid for s in joined] == ["c"]  # the slot is free at once
    sampled, release = batch.finished(step, [1, 1])
    assert release == ["a"]
    assert [t.rid for t in sampled] == ["b"]


def test_leaving_between_steps_releases_at_once_and_queued_leaves_quietly() -> None:
    batch = Batch(capacity=1, microbatches=1, queue_limit=1)
    batch.submit(seq("a"))
    batch.submit(seq("q"))
    assert batch.leave("q") == ([], [])
    assert batch.leave("a") == (["a"], [])
    assert batch.leave("nobody") == ([], [])


def test_one_step_in_flight_per_lane() -> None:
    batch = Batch(capacity=2, microbatches=2, queue_limit=0)
    batch.submit(seq("a"))
    batch.submit(seq("b"))
    first = batch.next_step(0)
    assert first is not None and batch.next_step(0) is None
    assert batch.next_step(1) is not None
    assert batch.lanes_with_work() == []


def test_a_failed_step_loses_its_sequences_and_frees_their_slots() -> None:
    batch = Batch(capacity=2, microbatches=1, queue_limit=1)
    batch.submit(seq("a"))
    batch.submit(seq("b"))
    batch.submit(seq("c"))
    step = batch.next_step(0)
    assert step is not None
    batch.leave("b")
    lost, release = batch.failed(step)
    assert lost == ["a"] and sorted(release) == ["a", "b"]
    assert [s.rid for s in batch.promote()] == [] and "c" in batch.running


def test_a_step_must_come_back_with_one_token_per_entry() -> None:
    batch = Batch(capacity=1, microbatches=1, queue_limit=0)
    batch.submit(seq("a"))
    step = batch.next_step(0)
    assert step is not None
    with pytest.raises(ValueError, match="1 entries came back with 2"):
        batch.finished(step, [1, 2])


def test_short_prompts_share_one_steps_prompt_rows() -> None:
    batch = Batch(capacity=3, microbatches=1, queue_limit=0, prefill_chunk=5)
    for rid in ("a", "b", "c"):
        batch.submit(seq(rid, prompt=2))
    step = batch.next_step(0)
    assert step is not None
    assert [(w.rid, len(w.tokens), w.samples) for w in step.work] == [
        ("a", 2, True),
        ("b", 2, True),
        ("c", 1, False),
    ]
