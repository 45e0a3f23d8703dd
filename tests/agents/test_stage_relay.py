"""A first or middle stage runs a decode step in nats-py's reader and relays the next stage's
answer from there (``StageServer._forward_now``): no task per crossing, and the same answers as
the task path, failures included (a next stage that is stuck is named, within the budget, and
the step's caches are dropped)."""

from __future__ import annotations

import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from shardplane.agents import hopwire
from shardplane.agents.executor import StageBackend
from shardplane.agents.pipeline import (
    PipelineClient,
    PipelineError,
    StageServer,
    even_bounds,
    serve_split,
)
from shardplane.bus import subjects
from shardplane.bus.messages import StageEntry, StageRequest
from tests.agents.test_run_hf import whole
from tests.kit import eventually

ROOT = Path(__file__).parent / "fixtures" / "tiny-llama3"


def tiny() -> tuple[StageBackend, dict[str, Any]]:
    return whole(ROOT)


async def test_decode_steps_cross_every_stage_without_a_task(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage, tensors = tiny()
    config = stage.config
    handled: list[tuple[int, str, int]] = []  # (stage, op, rows) of requests given a task
    real = StageServer._handle  # pyright: ignore[reportPrivateUsage]

    def counted(
        self: StageServer, reply_to: str, req: StageRequest | msgspec.DecodeError
    ) -> Coroutine[Any, Any, None]:
        assert isinstance(req, StageRequest), req
        handled.append((self.stage, req.op, sum(e.count for e in req.entries)))
        return real(self, reply_to, req)

    monkeypatch.setattr(StageServer, "_handle", counted)
    servers = await serve_split(nc, "relay", config, tensors, even_bounds(config.layers, 3))
    try:
        client = PipelineClient(nc, "relay", 3, config.hidden)
        prompt = list(range(1, 12))  # more rows than a step run inline: a task's
        steps = [s async for s, _, _ in client.generate([prompt], max_new_tokens=6)]
    finally:
        for s in servers:
            await s.stop()
    assert len(steps) == 6
    forwards = [(k, rows) for k, op, rows in handled if op == "forward"]
    assert forwards == [(0, len(prompt)), (1, len(prompt)), (2, len(prompt))]  # the prefill only
    # Every stage timed the crossing of each decode step from the reader as well.
    assert len(servers[0].timer._hops.get(1, [])) == 5  # pyright: ignore[reportPrivateUsage]


@pytest.mark.parametrize("rows", [1, 12])  # run in the reader / in a task
async def test_a_stuck_next_stage_is_named_within_the_budget(
    nc: Client, nats_url: str, rows: int
) -> None:
    stage, tensors = tiny()
    config = stage.config
    instance = f"stuck{rows}"
    servers = await serve_split(nc, instance, config, tensors, [0, 1, config.layers])
    await servers[1].stop()
    silent = await nats.connect(nats_url)
    try:
        await silent.subscribe(subjects.pipeline(instance, 1))  # takes requests, never answers
        await hopwire.settle(silent)
        client = PipelineClient(nc, instance, 2, config.hidden)
        started = time.monotonic()
        with pytest.raises(PipelineError) as err:
            await client.step(
                [StageEntry(seq_id="s", start=0, count=rows)],
                list(range(1, rows + 1)),
                deadline_s=2.0,
            )
        # Stage 0 answered (the caller's own timeout would name stage 0), before the budget.
        assert (err.value.stage, err.value.code) == (1, "timeout"), err.value
        assert "stage 1" in str(err.value) and time.monotonic() - started < 2.0
        await eventually(
            lambda: servers[0].backend.sequences(),
            lambda s: s == [],
            timeout=10,
            what="the failed step's cache dropped",
        )
    finally:
        await silent.close()
        await servers[0].stop()
