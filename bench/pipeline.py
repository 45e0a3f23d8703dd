"""pipeline: SmolLM2-135M generating through 1, 2 and 3 stages, each stage its own process, on
this machine's CPU (numpy fp32), against the floors measured in the same run.

Floors:
- compute: the bare in-process numpy forward of the same model (``agents.executor.NumpyStage``
  holding all 30 layers, no NATS, no frames), in a process of its own started right before
  each stage count's run (this machine is shared: conditions drift between minutes);
  ``overhead_1stage`` = 1-stage ms/token over it;
- transport: a raw NATS request-reply between this process and a responder process, with a
  payload of the same bytes as one hop's frame (hidden state + framing);
  ``hop_overhead_ms_p50`` is the p50 over every stage-to-stage crossing of the deepest run's
  decode steps, as the sending stage timed it (request to decoded reply, less the compute and
  crossings the downstream stages reported: framing, NATS, scheduling), and
  ``hop_over_floor`` is that over the raw request-reply measured right after that run.
  ``hop_over_gap_floor`` compares with a raw request-reply sent after computing as long as one
  stage does (``raw_request_reply_after_gap_ms_p50``): on a busy host, waking a responder
  that sat idle through a stage's compute costs several times a back-to-back round trip, and
  every real crossing pays that.

Prediction: the planner's cost model (``planner.profile``: bytes each stage reads per step)
with this host's bandwidth calibrated once, from the compute floor at batch 1, plus one raw
request-reply per crossing; ``predicted_over_measured`` for each case (stages x batch) says
how well that calibrated model predicts the pipeline.

``tokens_match_reference``: every case's greedy tokens equal the in-process floor's.

Every process (floor and stages) runs BLAS with ``--blas-threads`` threads (default 1): on a
shared 2-core machine, OpenBLAS threads that spin while their process waits for another stage
steal the core the working stage needs (measured: 1 thread 47-59 ms/token, 2 threads 120-310
ms/token for the bare forward on this machine under load).

Run: ``shardplane bench pipeline [--quick] [-- --tokens 32 --stages 1,2,3 --batches 1,4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats
import numpy as np

from shardplane.agents.executor import Entry, NumpyStage
from shardplane.agents.gguf import (
    load_packaged_stage,
    packaged_path,
    packaged_tokenizer,
    read_config,
)
from shardplane.agents.loader import StageSpec
from shardplane.agents.pipeline import PipelineClient, even_bounds
from shardplane.agents.stagerun import spawn_split, stop_all
from shardplane.bus.messages import StageEntry, StageRequest
from shardplane.natsserver import NatsServer
from shardplane.planner.catalog import resolve
from shardplane.render import table

MODEL = "smollm2-135m"
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colors are",
)
RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def echo(msg):
        await nc.publish(msg.reply, b"x" * 64)
    await nc.subscribe("bench.raw", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@dataclass
class Case:
    stages: int
    batch: int
    step_ms: list[float] = field(default_factory=lambda: [])
    compute_ms: list[float] = field(default_factory=lambda: [])  # sum of stages' compute
    hop_ms: list[float] = field(default_factory=lambda: [])  # every stage-to-stage crossing
    tokens: list[list[int]] = field(default_factory=lambda: [])

    @property
    def ms(self) -> float:
        return statistics.median(self.step_ms)


def floor_process(tokens: int, batches: list[int], env: dict[str, str]) -> dict[int, Case]:
    """The floor, measured in a fresh process with the stages' BLAS settings."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardplane.bench.pipeline",
            "--floor",
            "--tokens",
            str(tokens),
            "--batches",
            ",".join(map(str, batches)),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    raw = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        int(b): Case(
            stages=0,
            batch=int(b),
            step_ms=c["step_ms"],
            compute_ms=c["step_ms"],
            tokens=c["tokens"],
        )
        for b, c in raw.items()
    }


def floor_main(tokens: int, batches: list[int]) -> int:
    config, shard = load_packaged_stage(MODEL, StageSpec(0, 30, True, True))
    tok = packaged_tokenizer(MODEL)
    prompts = [tok.encode(p) for p in PROMPTS]
    whole = NumpyStage.build(
        config, shard.tensors, layer_start=0, layer_end=30, embeddings=True, head=True
    )
    floors = {b: floor_run(whole, prompts[:b], tokens) for b in batches}
    print(json.dumps({b: {"step_ms": c.step_ms, "tokens": c.tokens} for b, c in floors.items()}))
    return 0


def floor_run(stage: NumpyStage, prompts: list[list[int]], tokens: int) -> Case:
    """The bare in-process forward: prefill each prompt, then decode them together."""
    case = Case(stages=0, batch=len(prompts))
    seqs = [f"floor-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    last: list[int] = []
    for seq, ids in zip(seqs, prompts, strict=True):
        logits = stage.forward([Entry(seq, 0, len(ids))], np.array(ids))
        last.append(int(np.argmax(logits[0])))
    out = [[t] for t in last]
    positions = [len(p) for p in prompts]
    for _ in range(tokens - 1):
        entries = [Entry(s, p, 1) for s, p in zip(seqs, positions, strict=True)]
        started = time.perf_counter()
        logits = stage.forward(entries, np.array(last))
        case.step_ms.append((time.perf_counter() - started) * 1000)
        last = [int(np.argmax(row)) for row in logits]
        for o, t in zip(out, last, strict=True):
            o.append(t)
        positions = [p + 1 for p in positions]
    for seq in seqs:
        stage.release(seq)
    case.compute_ms = list(case.step_ms)
    case.tokens = out
    return case


async def pipeline_run(
    url: str,
    k: int,
    batches: list[int],
    prompts: list[list[int]],
    tokens: int,
    hidden: int,
    env: dict[str, str],
) -> list[Case]:
    bounds = even_bounds(30, k)
    procs = await asyncio.to_thread(spawn_split, url, MODEL, f"bench{k}", bounds, env)
    nc = await nats.connect(url)
    try:
        client = PipelineClient(nc, f"bench{k}", k, hidden)
        cases: list[Case] = []
        for batch in batches:
            case = Case(stages=k, batch=batch)
            out: list[list[int]] = [[] for _ in range(batch)]
            first = True
            async for step, ms, reply in client.generate(prompts[:batch], max_new_tokens=tokens):
                for o, t in zip(out, step, strict=True):
                    o.append(t)
                if not first:
                    case.step_ms.append(ms)
                    case.compute_ms.append(sum(reply.stage_ms))
                    case.hop_ms += reply.hop_ms
                first = False
            case.tokens = out
            cases.append(case)
        return cases
    finally:
        await nc.close()
        await asyncio.to_thread(stop_all, procs)


async def raw_rr_ms(url: str, payload: int, count: int, gap_ms: float = 0.0) -> float:
    """p50 of a raw NATS request-reply with ``payload`` bytes, to a responder process. With
    ``gap_ms``, this process computes (busy) that long before each request, as a stage does
    before it asks the next one: the responder has been idle meanwhile, and waking it up again
    is part of what a crossing costs on a busy host."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RESPONDER, url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        await proc.stdout.readline()
        nc = await nats.connect(url)
        data = b"\0" * payload
        samples: list[float] = []
        for _ in range(count):
            busy_until = time.perf_counter() + gap_ms / 1000
            while time.perf_counter() < busy_until:
                pass
            started = time.perf_counter()
            await nc.request("bench.raw", data, timeout=5)
            samples.append((time.perf_counter() - started) * 1000)
        await nc.close()
        return statistics.median(samples[count // 10 :])
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


def frame_bytes(batch: int, hidden: int) -> int:
    """Size of one hop's StageRequest carrying ``batch`` decode rows."""
    entries = tuple(StageEntry(seq_id="x" * 14, start=100, count=1) for _ in range(batch))
    req = StageRequest(
        instance_id="bench3", stage=1, entries=entries, hidden=b"\0" * (batch * hidden * 4)
    )
    return len(msgspec.msgpack.encode(req))


def predicted_ms(k: int, batch: int, bandwidth: float, hop_ms: float) -> float:
    """The cost model: bytes each stage reads per step / calibrated bandwidth, plus a raw
    request-reply per crossing (client to stage 0 included)."""
    profile = resolve(MODEL)
    reads = profile.read_bytes(batch)
    total = sum(reads) + profile.end_bytes(False, True)
    return total / bandwidth * 1000 + k * hop_ms


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench pipeline", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=None, help="per case (default 32, quick 8)")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args([a for a in (argv or []) if a != "--"])
    quick = quick or args.quick
    tokens: int = args.tokens or (8 if quick else 32)
    stage_counts = [int(x) for x in args.stages.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    if 1 not in stage_counts or 1 not in batches or max(batches) > len(PROMPTS):
        parser.error(
            f"--stages must include 1, --batches must include 1 and stay <= {len(PROMPTS)}"
        )
    if args.floor:
        return floor_main(tokens, batches)
    threads = str(args.blas_threads)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    return asyncio.run(run(tokens, stage_counts, batches, env, rr_count=100 if quick else 300))


async def run(
    tokens: int, stage_counts: list[int], batches: list[int], env: dict[str, str], rr_count: int
) -> int:
    tok = packaged_tokenizer(MODEL)
    prompts = [tok.encode(p) for p in PROMPTS]
    hidden = read_config(packaged_path(MODEL)).hidden
    floors: dict[tuple[int, int], Case] = {}
    raw: dict[tuple[int, int], float] = {}
    async with NatsServer() as server:
        cases: list[Case] = []
        for k in stage_counts:
            floor = await asyncio.to_thread(floor_process, tokens, batches, env)
            floors.update({(k, b): c for b, c in floor.items()})
            cases += await pipeline_run(server.url, k, batches, prompts, tokens, hidden, env)
            # Right after the run, so that both see the same machine.
            for b in batches:
                raw[(k, b)] = await raw_rr_ms(server.url, frame_bytes(b, hidden), rr_count)
        deepest = next(c for c in cases if c.stages == max(stage_counts) and c.batch == 1)
        gap = statistics.median(deepest.compute_ms) / deepest.stages
        gapped = await raw_rr_ms(server.url, frame_bytes(1, hidden), rr_count // 2, gap_ms=gap)
    return report(floors, raw, cases, tokens, hidden, (gap, gapped))


def report(
    floors: dict[tuple[int, int], Case],
    raw: dict[tuple[int, int], float],
    cases: list[Case],
    tokens: int,
    hidden: int,
    gapped: tuple[float, float],
) -> int:
    profile = resolve(MODEL)
    base = floors[(1, 1)]
    bandwidth = (sum(profile.read_bytes(1)) + profile.end_bytes(False, True)) / (base.ms / 1000)
    by = {(c.stages, c.batch): c for c in cases}
    one = by[(1, 1)]
    deepest = max(c.stages for c in cases)
    hop_samples = by[(deepest, 1)].hop_ms  # every crossing of every decode step, batch 1
    hop_p50 = statistics.median(hop_samples) if hop_samples else 0.0
    raw_hop = raw[(deepest, 1)]
    rows: list[tuple[str, ...]] = []
    figures: dict[str, Any] = {"model": MODEL, "tokens_per_case": tokens}
    pom: dict[str, float] = {}
    match = True
    for c in cases:
        ref = floors[(c.stages, c.batch)]
        same = c.tokens == ref.tokens
        match = match and same
        pred = predicted_ms(c.stages, c.batch, bandwidth, raw[(c.stages, c.batch)])
        pom[f"{c.stages}stage_b{c.batch}"] = round(pred / c.ms, 3)
        rows.append(
            (
                str(c.stages),
                str(c.batch),
                f"{c.ms:.2f}",
                f"{1000 * c.batch / c.ms:.1f}",
                f"{statistics.median(c.compute_ms):.2f}",
                f"{ref.ms:.2f}",
                f"{c.ms / ref.ms:.2f}",
                f"{pred:.2f}",
                "yes" if same else "NO",
            )
        )
        figures[f"ms_per_token_{c.stages}stage" + ("" if c.batch == 1 else f"_b{c.batch}")] = round(
            c.ms, 3
        )
    headers = (
        "stages",
        "batch",
        "ms/step",
        "tok/s",
        "compute ms",
        "floor ms",
        "over floor",
        "predicted",
        "tokens ok",
    )
    print(table(headers, rows))
    print(
        f"hop: +{hop_p50:.3f} ms per extra stage crossing (p50), raw NATS request-reply of the same "
        f"{frame_bytes(1, hidden)} bytes {raw_hop:.3f} ms back to back, {gapped[1]:.3f} ms after "
        f"{gapped[0]:.1f} ms of compute; calibrated host bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    figures.update(
        floor_ms_per_token=round(base.ms, 3),
        overhead_1stage=round(one.ms / base.ms, 3),
        hop_overhead_ms_p50=round(hop_p50, 4),
        raw_request_reply_ms_p50=round(raw_hop, 4),
        hop_over_floor=round(hop_p50 / raw_hop, 3) if hop_samples else None,
        raw_request_reply_after_gap_ms_p50=round(gapped[1], 4),
        hop_over_gap_floor=round(hop_p50 / gapped[1], 3) if hop_samples else None,
        predicted_over_measured=pom,
        calibrated_bandwidth_gbps=round(bandwidth / 1e9, 2),
        tokens_match_reference=match,
    )
    print(json.dumps(figures))
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
