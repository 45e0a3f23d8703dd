"""hop_profile: where one stage crossing's time goes, phase by phase, between two processes.

Why: ``bench pipeline`` reports a crossing's total (``hop_overhead_ms_p50``); to reduce it one
must know which part is ours (framing, the stage's own work around its compute) and which is
the host's (waking a process that sat idle). This bench plays an upstream stage in this process
(it computes, busy, ``--gap-ms``, then asks) against a real last stage of SmolLM2 (layers
20-30, numpy) in a process of its own, whose ``StageServer`` is wrapped to stamp each phase
with ``time.monotonic()`` (one system-wide clock on Linux, so stamps compare across processes):

- ``request_to_callback``: request sent -> nats-py's reader hands it to the stage
  (``StageServer._dispatch``: NATS routing, waking the idle stage process, parsing);
- ``callback_to_compute``: decoding the frame, checks (and, off the fast path, a task's start
  and the lock);
- ``compute``: the stage's layers (excluded from a hop, as the pipeline excludes it);
- ``compute_to_published``: sampling, the reply's framing, up to its publish;
- ``published_to_resumed``: publish -> this process has the reply (writing it, NATS, waking
  this process that sat idle through the stage's compute, the reader, the request's future);
- ``hop``: the whole request less ``compute``, as ``StageReply.hop_ms`` counts it.

Run: ``shardplane bench hop_profile [--quick] [-- --gap-ms 10 --count 60]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from typing import Any

import msgspec
import nats
import numpy as np

from shardplane.agents import hopwire
from shardplane.bus.messages import StageEntry, StageRequest
from shardplane.natsserver import NatsServer
from shardplane.render import table

MODEL = "smollm2-135m"
PHASES = (
    "request_to_callback",
    "callback_to_compute",
    "compute",
    "compute_to_published",
    "published_to_resumed",
    "hop",
)


async def serve(url: str) -> None:
    """The downstream stage, its phases stamped (child process)."""
    from shardplane.agents.loader import StageSpec
    from shardplane.agents.pipeline import StageServer, build_backend, load_assigned
    from shardplane.bus.messages import ShardAssignment

    spec = StageSpec(20, 30, embeddings=False, head=True)
    assignment = ShardAssignment(
        instance_id="hop", generation=1, node="hop", model=MODEL, stage=1,
        layer_start=20, layer_end=30, head=True,
    )  # fmt: skip
    shard = load_assigned(MODEL, spec, use_cuda=False)
    backend = build_backend(assignment, shard.tensors)
    marks: list[tuple[float, float, float, float]] = []
    forward = backend.forward
    computed: list[float] = [0.0, 0.0]

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        computed[0] = time.monotonic()
        out = forward(*args, **kwargs)
        computed[1] = time.monotonic()
        return out

    backend.forward = timed_forward
    nc = await nats.connect(url)
    server = StageServer(nc, instance_id="hop", stage=1, backend=backend, last=True)
    dispatch = server._dispatch  # pyright: ignore[reportPrivateUsage]
    publish_now = hopwire.publish_now  # what a stage answers with (hopwire.publish too)

    def stamped_publish(*args: Any, **kwargs: Any) -> bool:
        # Stamped as the reply starts out: once its bytes are written, this process may lose
        # the core to the ones they wake (the requester resumes before a later stamp).
        marks.append((entered[0], computed[0], computed[1], time.monotonic()))
        return publish_now(*args, **kwargs)

    entered = [0.0]

    def stamped_dispatch(msg: Any) -> None:
        entered[0] = time.monotonic()
        dispatch(msg)

    hopwire.publish_now = stamped_publish
    server._dispatch = stamped_dispatch  # pyright: ignore[reportPrivateUsage]
    await server.start()
    await nc.flush()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(json.dumps(marks), flush=True)


async def drive(url: str, gap_ms: float, count: int, hidden: int) -> list[tuple[float, float]]:
    """Upstream: compute (busy) ``gap_ms``, then ask as a stage asks; (sent, resumed) per request."""
    nc = await nats.connect(url)
    inbox = hopwire.inbox(nc)  # as a stage asks the next one (agents.pipeline)
    encoder = msgspec.msgpack.Encoder()
    frame = np.random.default_rng(0).standard_normal((1, hidden)).astype(np.float32).tobytes()
    out: list[tuple[float, float]] = []
    for i in range(count):
        busy = time.perf_counter() + gap_ms / 1000
        while time.perf_counter() < busy:
            pass
        entry = StageEntry(seq_id=f"h{i}", start=0, count=1)
        req = StageRequest(instance_id="hop", stage=1, entries=(entry,), hidden=frame)
        sent = time.monotonic()
        await inbox.request("pipeline.hop.1", encoder.encode(req), timeout=30)
        out.append((sent, time.monotonic()))
    await nc.close()
    return out


def phases(sent: list[tuple[float, float]], marks: list[list[float]]) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {p: [] for p in PHASES}
    for (s, r), (cb, c0, c1, pub) in zip(sent, marks, strict=True):
        for name, ms in zip(
            PHASES,
            (cb - s, c0 - cb, c1 - c0, pub - c1, r - pub, (r - s) - (c1 - c0)),
            strict=True,
        ):
            got[name].append(ms * 1000)
    return got


async def run(gap_ms: float, count: int) -> int:
    from shardplane.agents.gguf import packaged_path, read_config

    hidden = read_config(packaged_path(MODEL)).hidden
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    async with NatsServer() as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shardplane.bench.hop_profile", "--serve", server.url,
            stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            if not (await proc.stdout.readline()).startswith(b"ready"):
                raise RuntimeError("the stage process did not start")
            sent = await drive(server.url, gap_ms, count, hidden)
        finally:
            proc.terminate()
        marks: list[list[float]] = json.loads((await proc.stdout.read()).splitlines()[-1])
        await proc.wait()
    warm = count // 6  # the first requests pay first-use costs (allocator, caches)
    got = phases(sent[warm:], marks[warm:])
    p50 = {p: statistics.median(v) for p, v in got.items()}
    rows = [(p, f"{p50[p]:.3f}", f"{statistics.quantiles(got[p], n=10)[8]:.3f}") for p in PHASES]
    print(table(("phase", "p50 ms", "p90 ms"), rows))
    print(json.dumps({"gap_ms": gap_ms, "samples": count - warm, **{f"{p}_ms_p50": round(v, 4) for p, v in p50.items()}}))  # fmt: skip
    return 0


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench hop_profile", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="upstream compute per step")
    parser.add_argument("--count", type=int, default=None, help="requests (120; quick 30)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # child: the NATS URL
    args = parser.parse_args([a for a in (argv or []) if a != "--"])
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    count: int = args.count or (30 if quick or args.quick else 120)
    return asyncio.run(run(args.gap_ms, count))


if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
