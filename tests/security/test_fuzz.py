"""Hypothesis-driven bad input through the whole secured system (bounded here; `shardplane
bench fuzz` runs 20,000): every input answered or dead-lettered with a reason, no internal
errors, nothing valid lost, every service alive and working afterwards."""

from __future__ import annotations

import logging

import pytest

from shardplane.bench._fuzzing import TARGETS, draw_inputs, fuzz_system


async def test_bad_input_everywhere_is_answered_and_nothing_dies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="shardplane")
    result = await fuzz_system(dict.fromkeys(TARGETS, 60), seed=1)
    assert result.failures == []
    assert result.inputs == dict.fromkeys(TARGETS, 60)
    assert result.answered == result.inputs
    assert sum(result.internal_errors.values()) == 0
    assert result.valid_lost == 0
    assert result.crashes == 0
    # The inputs were not all trivially rejected: some planned, some were dead-lettered.
    assert result.codes.get("ok", 0) + result.codes.get("http 200", 0) > 0
    assert result.codes.get("invalid_request", 0) > 0
    assert 0 < result.deadlettered < 3 * 60


def test_inputs_are_reproducible_and_varied() -> None:
    first = draw_inputs("request", 50, seed=3)
    assert first == draw_inputs("request", 50, seed=3)
    assert len(set(first)) > 25
    assert any(d.startswith(b"{") for d in first) and any(d[:1] >= b"\x80" for d in first)
