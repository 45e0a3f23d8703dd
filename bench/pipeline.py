"""pipeline: SmolLM2-135M generating through 1, 2 and 3 stages, each stage its own process, on
this machine's CPU (numpy fp32), against the floors measured in the same run.

Floors:
- compute: the bare in-process numpy forward of the same model (``agents.executor.NumpyStage``
  holding all 30 layers, no NATS, no frames), in a process of its own started right before
  each stage count's run (this machine is shared: conditions drift between minutes);
  ``overhead_1stage`` = 1-stage ms/token over it;
- transport: raw NATS request-replies between this process and a responder process, with a
  payload of the same bytes as one hop's frame (hidden state + framing), measured right after
  the runs. ``hop_overhead_ms_p50`` is the p50 over every stage-to-stage crossing of the
  deepest run's batch-1 decode steps, as the sending stage timed it (request to decoded reply,
  less the compute and crossings the downstream stages reported: framing, NATS, scheduling,
  waking processes). Three floors, each named in the last line:

  - ``raw_request_reply_ms_p50`` (old floor; ``hop_over_back_to_back_floor``): requests sent
    back to back, so both processes stay awake. No crossing of a pipeline is like that.
  - ``raw_request_reply_after_gap_ms_p50`` (``hop_over_gap_floor``): the requester computes
    (busy) one stage's compute time before each request, the responder answers at once.
  - ``raw_request_reply_comparable_ms_p50`` (``hop_over_floor``): both compute one stage's
    compute time, the responder before it answers, and its busy time is taken off the sample,
    exactly as a stage's hop excludes the compute downstream reported. That is a crossing: the
    next stage has sat idle through this stage's compute and must be woken, and this stage
    then sits idle through the next one's compute and must be woken for the reply. On a busy
    2-core host each wake-up costs several times a back-to-back round trip (profiled: request
    to the responder's callback 0.35-0.7 ms, reply published to the requester resumed
    0.34-0.6 ms, the stage's own work around its compute 0.2 ms).
  - ``raw_request_reply_streaming_ms_p50`` (``hop_over_streaming_floor``, for information): as
    the comparable floor, but the busy time on both sides streams memory (sums over 64 MB in
    8 MB blocks, twice this host's 32 MB L3) the way a stage's forward streams its weights,
    instead of spinning in place. A stage's compute evicts from the caches everything the
    crossing's code and data (the kernel's socket paths, the interpreter, asyncio, nats-py, the
    NATS server) then has to fetch again; a spinning floor keeps them warm. Measured while
    profiling (a raw responder, 7 ms busy on both sides, streaming as matrix-vector products
    over 140 MB): spinning 0.57-0.74 ms, streaming 1.2-1.6 ms, the same crossing code.

Prediction (``predicted_over_measured``): as production predicts a later plan, from the step
reports the stages of the run before made (``agents.stagerun --report-steps``: the worker's own
``StepTimer`` figures, which a worker publishes in ``ShardStatus``), calibrated by the
projector's code into this host's GB/s and GFLOPS; the first stage count has no run before it
and is predicted from the floor as below. Why not the floor throughout: a stage process computes
its layers in bursts after sitting idle through the other stages' compute, in a process of its
own beside the others, and on this shared 2-core host that is measurably slower than the bare
forward back to back (last session, load 3.6: three stages' compute summed to 1.24x the floor's;
unloaded, 1.0-1.05x); a calibration from the floor cannot know it, the workers' reports do.

Prediction from the floor (``predicted_over_measured_floor_calibrated``, kept for comparison):
each stage count's floor processes (batch 1 and the larger batches; one right
before the run and one right after it, pooled, since this shared machine drifts) are turned into
the step reports a worker publishes and calibrated by the projector's own code
(``projector.calibration``: bandwidth from batch 1, compute from the larger batches) on a
device that describes this host's CPU, which is what ran; each case is then the planner's
``max(read / bandwidth, FLOPs / compute)`` per stage (``planner.schedule.stage_ms``) plus one
comparable-floor crossing per stage. ``predicted_over_measured`` for each case (stages x batch)
says how well that calibrated model predicts the pipeline.

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
import struct
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
from shardplane.agents.stagerun import read_steps, spawn_split, stop_all
from shardplane.agents.steptiming import StepTiming, step_flops
from shardplane.bench._pipeline_model import calibrated, from_steps, predicted_ms
from shardplane.bus.messages import StageEntry, StageRequest
from shardplane.natsserver import NatsServer
from shardplane.render import table

MODEL = "smollm2-135m"
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colors are",
)
RESPONDER = """
import asyncio, struct, sys, time, nats
from shardplane.bench.pipeline import busy_wait
async def main():
    nc = await nats.connect(sys.argv[1])
    gap_ms, streaming = float(sys.argv[2]), sys.argv[3] == "stream"
    async def echo(msg):
        # Busy for gap_ms (a stage computing), then answer with how long that took.
        started = time.perf_counter()
        busy_wait(gap_ms, streaming)
        busy = (time.perf_counter() - started) * 1000
        await nc.publish(msg.reply, struct.pack("<d", busy) + b"x" * 56)
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
    flops: list[float] = field(default_factory=lambda: [])  # per step (agents.steptiming)
    read_bytes: int = 0
    after_ms: list[float] = field(default_factory=lambda: [])  # the floor again after the run

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
            flops=c["flops"],
            read_bytes=c["read_bytes"],
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
    figures = {
        b: {"step_ms": c.step_ms, "tokens": c.tokens, "flops": c.flops, "read_bytes": c.read_bytes}
        for b, c in floors.items()
    }
    print(json.dumps(figures))
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
        case.flops.append(step_flops(stage, entries))
        last = [int(np.argmax(row)) for row in logits]
        for o, t in zip(out, last, strict=True):
            o.append(t)
        positions = [p + 1 for p in positions]
    for seq in seqs:
        stage.release(seq)
    case.compute_ms = list(case.step_ms)
    case.tokens = out
    case.read_bytes = stage.read_bytes()
    return case


async def pipeline_run(
    url: str,
    k: int,
    batches: list[int],
    prompts: list[list[int]],
    tokens: int,
    hidden: int,
    env: dict[str, str],
) -> tuple[list[Case], list[StepTiming]]:
    """The run's cases and the step reports its stage processes made, in order."""
    bounds = even_bounds(30, k)
    procs = await asyncio.to_thread(spawn_split, url, MODEL, f"bench{k}", bounds, env, True)
    try:
        cases = await drive_cases(url, k, batches, prompts, tokens, hidden)
    finally:
        await asyncio.to_thread(stop_all, procs)
    steps: list[StepTiming] = []
    for proc in procs:
        assert proc.stdout is not None
        steps += read_steps(proc.stdout.read())
    return cases, steps


async def drive_cases(
    url: str, k: int, batches: list[int], prompts: list[list[int]], tokens: int, hidden: int
) -> list[Case]:
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


STREAM_BLOCKS = 8  # 8 blocks of 8 MB: 64 MB streamed in steps of about 0.3 ms
_streamed: list[np.ndarray[Any, Any]] = []


def busy_wait(ms: float, streaming: bool = False) -> None:
    """Keep this core busy ``ms``: spinning in place, or (``streaming``) streaming 64 MB of
    memory through the caches, as a stage's forward streams its weights (sums, not BLAS, so the
    figure does not depend on this process's BLAS threads)."""
    until = time.perf_counter() + ms / 1000
    if not streaming:
        while time.perf_counter() < until:
            pass
        return
    if not _streamed:
        _streamed.extend(np.ones(2 << 20, np.float32) for _ in range(STREAM_BLOCKS))
    i = 0
    while time.perf_counter() < until:
        _streamed[i % STREAM_BLOCKS].sum()
        i += 1


async def raw_rr_ms(
    url: str,
    payload: int,
    count: int,
    gap_ms: float = 0.0,
    reply_gap_ms: float = 0.0,
    streaming: bool = False,
) -> float:
    """p50 of a raw NATS request-reply with ``payload`` bytes, to a responder process. With
    ``gap_ms``, this process computes (busy) that long before each request, as a stage does
    before it asks the next one: the responder has been idle meanwhile, and waking it up again
    is part of what a crossing costs on a busy host. With ``reply_gap_ms`` the responder
    computes that long before it answers, as the next stage does, and its busy time is taken
    off the sample (as a stage's hop excludes the compute downstream reported): then this
    process has been idle as long as a waiting stage, and its wake-up is in the sample too.
    ``streaming``: both sides stream memory while busy instead of spinning (``busy_wait``)."""
    mode = "stream" if streaming else "spin"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RESPONDER, url, str(reply_gap_ms), mode,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        await proc.stdout.readline()
        nc = await nats.connect(url)
        data = b"\0" * payload
        samples: list[float] = []
        for _ in range(count):
            busy_wait(gap_ms, streaming)
            started = time.perf_counter()
            msg = await nc.request("bench.raw", data, timeout=5)
            busy = struct.unpack_from("<d", msg.data)[0]
            samples.append((time.perf_counter() - started) * 1000 - busy)
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
    steps: dict[int, list[StepTiming]] = {}
    async with NatsServer() as server:
        cases: list[Case] = []
        for k in stage_counts:
            floor = await asyncio.to_thread(floor_process, tokens, batches, env)
            floors.update({(k, b): c for b, c in floor.items()})
            run_cases, steps[k] = await pipeline_run(
                server.url, k, batches, prompts, tokens, hidden, env
            )
            cases += run_cases
            # Right after the run, so that both see the same machine.
            for b in batches:
                raw[(k, b)] = await raw_rr_ms(server.url, frame_bytes(b, hidden), rr_count)
            after = await asyncio.to_thread(floor_process, tokens, batches, env)
            for b, c in after.items():
                floors[(k, b)].after_ms = c.step_ms
        floors_of = await floor_crossings(server.url, cases, batches, hidden, rr_count // 2)
    context = round(statistics.mean(len(p) for p in prompts) + tokens / 2)
    return report(floors, raw, cases, tokens, hidden, floors_of, context, steps)


@dataclass
class Crossing:
    """Raw request-reply floors measured after the deepest run, for comparison with its hops."""

    gap_ms: dict[int, float]  # one stage's compute per batch (the deepest run's p50 / stages)
    one_sided: float  # batch 1: the requester computed gap_ms first, the responder answers at once
    comparable: dict[int, float]  # both compute gap_ms, as adjacent stages do (busy time off)
    streaming: float  # batch 1, as comparable, the busy time streaming memory (information)


async def floor_crossings(
    url: str, cases: list[Case], batches: list[int], hidden: int, count: int
) -> Crossing:
    deepest = max(c.stages for c in cases)
    gap = {
        c.batch: statistics.median(c.compute_ms) / c.stages for c in cases if c.stages == deepest
    }
    one = await raw_rr_ms(url, frame_bytes(1, hidden), count, gap_ms=gap[1])
    comparable = {
        b: await raw_rr_ms(url, frame_bytes(b, hidden), count, gap_ms=gap[b], reply_gap_ms=gap[b])
        for b in batches
    }
    streaming = await raw_rr_ms(
        url, frame_bytes(1, hidden), count, gap_ms=gap[1], reply_gap_ms=gap[1], streaming=True
    )
    return Crossing(gap, one, comparable, streaming)


def case_rows(
    floors: dict[tuple[int, int], Case],
    cases: list[Case],
    predict: dict[tuple[int, int], float],
) -> tuple[list[tuple[str, ...]], dict[str, Any], bool]:
    """The table's rows, each case's ms/token figure, and whether every case's tokens match."""
    rows: list[tuple[str, ...]] = []
    figures: dict[str, Any] = {}
    match = True
    for c in cases:
        ref = floors[(c.stages, c.batch)]
        same = c.tokens == ref.tokens
        match = match and same
        pred = predict[(c.stages, c.batch)]
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
                f"{pred / c.ms:.2f}",
                "yes" if same else "NO",
            )
        )
        key = f"ms_per_token_{c.stages}stage" + ("" if c.batch == 1 else f"_b{c.batch}")
        figures[key] = round(c.ms, 3)
    return rows, figures, match


HEADERS = (
    "stages",
    "batch",
    "ms/step",
    "tok/s",
    "compute ms",
    "floor ms",
    "over floor",
    "predicted",
    "pred/meas",
    "tokens ok",
)


def floor_host(floors: dict[tuple[int, int], Case], k: int) -> tuple[float, float | None]:
    """This host calibrated from the floor measured right before and right after the ``k``-stage
    run (this machine is shared, and its speed drifts between minutes)."""
    return calibrated(
        {
            b: (c.step_ms + c.after_ms, c.read_bytes, statistics.median(c.flops))
            for (kk, b), c in floors.items()
            if kk == k
        }
    )


def hosts(
    floors: dict[tuple[int, int], Case], steps: dict[int, list[StepTiming]]
) -> tuple[dict[int, tuple[float, float | None]], dict[int, str]]:
    """The host each stage count is predicted with, and where it came from: the step reports
    of the run before it (as the projector would hold them when the planner plans the next
    one), figure by figure, else the floor around its own run."""
    host: dict[int, tuple[float, float | None]] = {}
    source: dict[int, str] = {}
    before: int | None = None
    for k in steps:  # in the order they ran
        floor_gbps, floor_tflops = floor_host(floors, k)
        gbps, tflops = from_steps(steps[before]) if before is not None else (None, None)
        host[k] = (gbps or floor_gbps, tflops or floor_tflops)
        source[k] = f"{before}stage_steps" if gbps is not None else "floor"
        before = k
    return host, source


def report(
    floors: dict[tuple[int, int], Case],
    raw: dict[tuple[int, int], float],
    cases: list[Case],
    tokens: int,
    hidden: int,
    crossing: Crossing,
    context: int,
    steps: dict[int, list[StepTiming]],
) -> int:
    first = min(k for k, _ in floors)
    host, source = hosts(floors, steps)
    gbps, tflops = floor_host(floors, first)

    def predictions(of: dict[int, tuple[float, float | None]]) -> dict[tuple[int, int], float]:
        return {
            (c.stages, c.batch): predicted_ms(
                c.stages, c.batch, *of[c.stages], crossing.comparable[c.batch], context
            )
            for c in cases
        }

    predict = predictions(host)
    predict_floor = predictions({k: floor_host(floors, k) for k in steps})
    rows, figures, match = case_rows(floors, cases, predict)
    print(table(HEADERS, rows))
    by = {(c.stages, c.batch): c for c in cases}
    deepest = max(c.stages for c in cases)
    hop_samples = by[(deepest, 1)].hop_ms  # every crossing of every decode step, batch 1
    hop = statistics.median(hop_samples) if hop_samples else 0.0
    b2b, comparable = raw[(deepest, 1)], crossing.comparable[1]
    print(
        f"hop: +{hop:.3f} ms per stage crossing (p50, batch 1, {deepest} stages); raw NATS "
        f"request-reply of the same {frame_bytes(1, hidden)} bytes between two processes: "
        f"{b2b:.3f} ms back to back (old floor), {crossing.one_sided:.3f} ms after "
        f"{crossing.gap_ms[1]:.1f} ms of compute on the requester only, {comparable:.3f} ms "
        f"with {crossing.gap_ms[1]:.1f} ms of compute on both sides (comparable floor), "
        f"{crossing.streaming:.3f} ms when that compute streams memory as a stage does; "
        f"calibrated host (before the 1-stage run) {gbps:.1f} GB/s, "
        f"{(tflops or 0) * 1000:.1f} GFLOPS"
    )

    def ratio(floor: float) -> float | None:
        return round(hop / floor, 3) if hop_samples else None

    figures = {
        "model": MODEL,
        "tokens_per_case": tokens,
        **figures,
        "floor_ms_per_token": round(floors[(first, 1)].ms, 3),
        "overhead_1stage": round(by[(1, 1)].ms / floors[(1, 1)].ms, 3),
        "hop_overhead_ms_p50": round(hop, 4),
        "raw_request_reply_ms_p50": round(b2b, 4),
        "hop_over_back_to_back_floor": ratio(b2b),
        "raw_request_reply_after_gap_ms_p50": round(crossing.one_sided, 4),
        "hop_over_gap_floor": ratio(crossing.one_sided),
        "raw_request_reply_comparable_ms_p50": round(comparable, 4),
        "hop_over_floor": ratio(comparable),
        "raw_request_reply_streaming_ms_p50": round(crossing.streaming, 4),
        "hop_over_streaming_floor": ratio(crossing.streaming),
        "predicted_over_measured": {
            f"{k}stage_b{b}": round(predict[(k, b)] / by[(k, b)].ms, 3) for k, b in by
        },
        "calibrated_from": {f"{k}stage": source[k] for k in steps},
        "predicted_over_measured_floor_calibrated": {
            f"{k}stage_b{b}": round(predict_floor[(k, b)] / by[(k, b)].ms, 3) for k, b in by
        },
        "calibrated_bandwidth_gbps": round(gbps, 2),
        "calibrated_gflops": round(tflops * 1000, 2) if tflops else None,
        "tokens_match_reference": match,
    }
    print(json.dumps(figures))
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
