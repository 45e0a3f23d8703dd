"""serve: SmolLM2-135M placed by the planner over 2 stages on this machine, served through the
OpenAI-compatible API with continuous batching, loaded by 1, 4 and 16 concurrent clients
speaking the official ``openai`` client (streaming completions, greedy).

The stack is the real one: NATS, the planner and the projector (in this process), two agent
processes (``shardplane agent --cpu-device``, each its own node with this host's RAM as its one
device, each running its stage in its own worker), and the API (in this process). The instance
is placed for a batch of 16 in 2 micro-batches, so 16 clients run together, in 2 micro-batches
pipelined over the 2 stages.

Per concurrency c: every client sends ``--requests`` streaming completions one after another;
``tokens_per_s_c`` is all completion tokens (from ``usage``) over the phase's wall time;
TTFT is request to first text chunk, ITL the gaps between text chunks (a chunk is one token
except where a token ends mid-character or may begin a stop string).

The floor, in the same run: the pipeline driven directly (``PipelineClient.generate``, no HTTP,
no scheduler) at batch 1, and at batch 16 as the plan's M micro-batches, each its own
concurrent generation (the schedule the batcher runs), so ``over_pipeline_1``/``_16`` say what
the API and the batching cost on top of it. Its decode steps are the profile: the wall time
of a micro-batch's step (``pipeline_step_ms_p50_16``: one micro-batch's round, P(M) when the
stages overlap) and each stage's compute as the stage timed it
(``pipeline_stage_ms_p50_16``, to compare with the calibrated t_s of the prediction). And
where the host's cores went in each phase (``cpu_cores_16``: CPU seconds over wall seconds of
this process, which holds the API, the batcher and the clients, of each agent and of NATS):
the two stages overlap only as far as the other processes leave them cores.

The prediction: the planner's own figure for the PLACED plan at batch 16. The placement's reply
was computed before anything ran (the CPU device's memcpy bandwidth, no compute term: a CPU has
no TFLOPS figure). The workers report measured step times (calibration: bandwidth from batch-1
steps, compute from steps of several sequences); after the 16-client phase, the placed stages
(same devices, same layer ranges, batch 16 in M=2) are scored again with those figures by the
planner's own cost model (planner.rescore): that is ``predicted_tokens_per_s_16``. A dry-run
re-placement of the same request may pick another split; its figure is kept as
``replan_tokens_per_s_16`` for comparison, not as the prediction. The placement asks for the
context the bench's sequences reach (the longest prompt plus ``--tokens``): the planner prices
every step at ``context_tokens`` (KV reads and attention over the context, DESIGN "Planner
model"), so a plan priced at a longer context than the one run would predict slower steps
than those measured (at 1024 the attention term alone adds a third to a layer's FLOPs).

Run: ``shardplane bench serve [--quick] [-- --tokens 32 --requests 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client

from shardplane.agents.gguf import packaged_path, packaged_tokenizer, read_config
from shardplane.agents.pipeline import PipelineClient
from shardplane.bus.messages import DeviceState, NodeState, PlacementReply
from shardplane.natsserver import NatsServer
from shardplane.planner.catalog import resolve
from shardplane.planner.cost import Evaluation
from shardplane.planner.rescore import rescore
from shardplane.render import table

MODEL = "smollm2-135m"
INSTANCE = "bench-serve"
NODES = ("serve-a", "serve-b")
BATCH = 16
MICROBATCHES = 2
CONCURRENCY = (1, 4, 16)
PROMPTS = (
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "The three primary colors are",
    "My favourite food is",
    "In 1492, Columbus",
    "Water boils at",
    "The quick brown fox",
    "A good night's sleep",
    "The largest planet in our solar system",
    "To make bread, you need",
    "The history of Rome",
    "Machine learning is",
    "On a rainy afternoon,",
    "The best way to learn a language",
    "Dear diary, today",
)


@dataclass
class Phase:
    clients: int
    wall_s: float = 0.0
    tokens: int = 0
    ttft_ms: list[float] = field(default_factory=lambda: [])
    itl_ms: list[float] = field(default_factory=lambda: [])
    errors: list[str] = field(default_factory=lambda: [])
    cpu_s: dict[str, float] = field(default_factory=lambda: {})  # CPU seconds per process

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def p50(self, samples: list[float]) -> float:
        return statistics.median(samples) if samples else 0.0


def spawn_agents(url: str, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shardplane.cli",
                "agent",
                "--nats-url",
                url,
                "--node",
                node,
                "--cpu-device",
                "--interval",
                "1",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for node in NODES
    ]


def stop_agents(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def workload_context(prompt_tokens: list[int], tokens: int) -> int:
    """The context the bench's sequences reach: the longest prompt plus the tokens each
    request generates."""
    if not prompt_tokens or tokens < 1:
        raise ValueError(f"need prompts and tokens >= 1, got {prompt_tokens} and {tokens}")
    return max(prompt_tokens) + tokens


def prompt_lengths() -> list[int]:
    tok = packaged_tokenizer(MODEL)
    return [len(tok.encode(p)) for p in PROMPTS]


def placement_body(dry_run: bool, context_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "instance_id": INSTANCE if not dry_run else INSTANCE + "-calibrated",
        "batch": BATCH,
        "microbatches": MICROBATCHES,
        "min_stages": 2,
        "max_stages": 2,
        "context_tokens": context_tokens,
        "dry_run": dry_run,
    }


async def one_client(client: Any, index: int, requests: int, tokens: int, phase: Phase) -> None:
    for r in range(requests):
        prompt = PROMPTS[(index + r) % len(PROMPTS)]
        sent = time.perf_counter()
        last: float | None = None
        try:
            stream = await client.completions.create(
                model=INSTANCE,
                prompt=prompt,
                max_tokens=tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    phase.tokens += chunk.usage.completion_tokens
                if not chunk.choices or not chunk.choices[0].text:
                    continue
                now = time.perf_counter()
                if last is None:
                    phase.ttft_ms.append((now - sent) * 1000)
                else:
                    phase.itl_ms.append((now - last) * 1000)
                last = now
        except Exception as exc:  # counted and reported: errors must be 0
            phase.errors.append(f"{type(exc).__name__}: {exc}")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (a gone process is left out)."""
    import psutil

    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[name] = times.user + times.system
    return out


def cores_used(
    before: dict[str, float], after: dict[str, float], wall_s: float
) -> dict[str, float]:
    """CPU seconds per process over a phase, as cores kept busy on average."""
    if wall_s <= 0:
        return {}
    return {n: (after[n] - before[n]) / wall_s for n in after if n in before}


async def load(
    base_url: str, clients: int, requests: int, tokens: int, pids: dict[str, int]
) -> Phase:
    import openai

    phase = Phase(clients)
    async with openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600
    ) as client:
        cpu_before = cpu_seconds(pids)
        started = time.perf_counter()
        await asyncio.gather(
            *(one_client(client, i, requests, tokens, phase) for i in range(clients))
        )
        phase.wall_s = time.perf_counter() - started
        phase.cpu_s = cores_used(cpu_before, cpu_seconds(pids), phase.wall_s)
    return phase


@dataclass
class Floor:
    """The pipeline driven directly: tokens/s, and each decode step of each micro-batch (its
    wall ms, and each stage's compute ms as the stage timed it)."""

    batch: int
    microbatches: int
    tokens_per_s: float = 0.0
    step_ms: list[float] = field(default_factory=lambda: [])
    stage_ms: list[tuple[float, ...]] = field(default_factory=lambda: [])

    @property
    def step_ms_p50(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else 0.0

    @property
    def stage_ms_p50(self) -> tuple[float, ...]:
        """Per stage, the median compute of its decode steps (empty when none ran)."""
        return tuple(statistics.median(column) for column in zip(*self.stage_ms, strict=True))


def lanes_of(prompts: list[list[int]], microbatches: int) -> list[list[list[int]]]:
    """The prompts dealt into ``microbatches`` lanes as the batcher fills them (each joins the
    lane with the fewest, so sizes differ by at most one); no empty lane."""
    lanes = [prompts[i :: max(1, microbatches)] for i in range(max(1, microbatches))]
    return [lane for lane in lanes if lane]


async def pipeline_floor(nc: Client, batch: int, microbatches: int, tokens: int) -> Floor:
    """The pipeline driven directly: ``batch`` prompts in ``microbatches`` concurrent
    generations (prefill, then ``tokens`` - 1 decode steps each)."""
    tok = packaged_tokenizer(MODEL)
    hidden = read_config(packaged_path(MODEL)).hidden
    client = PipelineClient(nc, INSTANCE, 2, hidden)
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    floor = Floor(batch, microbatches)
    produced = 0

    async def lane(group: list[list[int]]) -> None:
        nonlocal produced
        first = True
        async for step, ms, reply in client.generate(group, max_new_tokens=tokens):
            produced += len(step)
            if not first:  # the first is the prefill
                floor.step_ms.append(ms)
                floor.stage_ms.append(tuple(reply.stage_ms))
            first = False

    started = time.perf_counter()
    await asyncio.gather(*(lane(group) for group in lanes_of(prompts, microbatches)))
    floor.tokens_per_s = produced / (time.perf_counter() - started)
    return floor


def missing_calibration(placed: PlacementReply, devices: list[DeviceState]) -> list[str]:
    """What calibration has not measured yet on the placed devices (empty: both figures on
    every device)."""
    by_ref = {f"{d.sample.node}/{d.sample.index}": d for d in devices}
    missing: list[str] = []
    for s in placed.stages:
        d = by_ref.get(s.device)
        if d is None:
            missing.append(f"{s.device} not in the state")
            continue
        lacks = [
            what
            for what, value in (("bandwidth", d.measured_gbps), ("compute", d.measured_tflops))
            if value is None
        ]
        if lacks:
            missing.append(f"{s.device} lacks measured {' and '.join(lacks)}")
    return missing


async def calibrated_state(
    nc: Client, placed: PlacementReply, timeout_s: float = 30.0
) -> tuple[list[DeviceState], list[NodeState]]:
    """The cluster state once every placed device is calibrated (the projector folds in the
    workers' step times as they come); the last state read otherwise."""
    from shardplane.status import read_state

    deadline = time.monotonic() + timeout_s
    while True:
        devices, nodes, _ = await read_state(nc)
        if not missing_calibration(placed, devices) or time.monotonic() > deadline:
            return devices, nodes
        await asyncio.sleep(1.0)


async def replan(nc: Client, context_tokens: int) -> PlacementReply:
    """A dry run of the same placement request with the calibrated state (for comparison)."""
    from shardplane.commands import request_placement

    return await request_placement(nc, placement_body(True, context_tokens))


@dataclass
class Prediction:
    """The placed plan scored with the calibrated figures, and how far calibration got."""

    evaluation: Evaluation | None
    basis: str
    replan: PlacementReply


def predict(
    placed: PlacementReply,
    devices: list[DeviceState],
    nodes: list[NodeState],
    replanned: PlacementReply,
) -> Prediction:
    missing = missing_calibration(placed, devices)
    try:
        ev = rescore(placed, resolve(MODEL), devices, nodes)
    except ValueError as exc:
        return Prediction(None, f"placed plan not scorable: {exc}", replanned)
    basis = (
        "the placed plan (its devices, layer ranges, batch and M) scored by the planner's cost "
        "model with calibrated figures: measured bandwidth and measured compute per device"
        if not missing
        else "the placed plan scored with the figures the state has (the CPU's memcpy bandwidth "
        f"where none was measured, no compute term where none was); incomplete: {'; '.join(missing)}"
    )
    return Prediction(ev, basis, replanned)


async def run(tokens: int, requests: int, env: dict[str, str]) -> int:
    from shardplane.api.server import make_app, start_app
    from shardplane.commands import request_placement, run_services, wait_for_devices
    from shardplane.generate import wait_loaded

    async with NatsServer() as server:
        stop = asyncio.Event()
        tasks = await run_services(
            server.url, stop, api=False, controller=False, workers=False, interval_s=1.0
        )
        agents = spawn_agents(server.url, env)
        nc = await nats.connect(server.url)
        try:
            if await wait_for_devices(nc, len(NODES), 120) < len(NODES):
                raise RuntimeError(f"the {len(NODES)} agents' CPU devices did not show up")
            context = workload_context(prompt_lengths(), tokens)
            placed = await request_placement(nc, placement_body(False, context))
            if not placed.ok:
                raise RuntimeError(f"placement failed: {placed.error}")
            await wait_loaded(nc, INSTANCE, placed.generation, 300)
            runner, base = await start_app(make_app(nc))
            try:
                floor_1 = await pipeline_floor(nc, 1, 1, tokens)
                pids = {
                    "bench": os.getpid(),  # the API, the batcher, the clients, planner, projector
                    **{node: proc.pid for node, proc in zip(NODES, agents, strict=True)},
                    **({"nats": server.proc.pid} if server.proc is not None else {}),
                }
                phases = [await load(base, c, requests, tokens, pids) for c in CONCURRENCY]
                floor_16 = await pipeline_floor(nc, BATCH, placed.microbatches, tokens)
                devices, node_states = await calibrated_state(nc, placed)
                prediction = predict(placed, devices, node_states, await replan(nc, context))
            finally:
                await runner.cleanup()
        finally:
            await nc.close()
            await asyncio.to_thread(stop_agents, agents)
            stop.set()
            _, pending = await asyncio.wait(tasks, timeout=15)
            for task in pending:
                task.cancel()
    return report(placed, prediction, phases, (floor_1, floor_16), tokens, requests)


def report(
    placed: PlacementReply,
    prediction: Prediction,
    phases: list[Phase],
    floors: tuple[Floor, Floor],
    tokens: int,
    requests: int,
) -> int:
    rows = [
        (
            str(p.clients),
            str(p.tokens),
            f"{p.wall_s:.2f}",
            f"{p.tokens_per_s:.1f}",
            f"{p.p50(p.ttft_ms):.0f}",
            f"{p.p50(p.itl_ms):.1f}",
            str(len(p.errors)),
        )
        for p in phases
    ]
    print(
        table(("clients", "tokens", "wall s", "tok/s", "TTFT ms p50", "ITL ms p50", "errors"), rows)
    )
    by = {p.clients: p for p in phases}
    ev, replanned = prediction.evaluation, prediction.replan
    predicted_16 = ev.tokens_per_s if ev is not None else 0.0

    def split(reply: PlacementReply) -> str:
        return " | ".join(
            f"{s.node}/{s.device} [{s.layer_start},{s.layer_end})" for s in reply.stages
        )

    print(
        f"placed: {split(placed)}, batch {placed.batch} in M={placed.microbatches} at context {placed.context_tokens}, "
        f"plan {placed.tokens_per_s:.1f} tok/s (step {placed.step_ms:.2f} ms) before calibration; "
        "planned at " + ", ".join(f"{s.device} {s.bandwidth_gbps:.2f} GB/s" for s in placed.stages)
    )
    if ev is not None:
        print(
            f"placed plan, calibrated: step {ev.step_ms:.2f} ms, {ev.tokens_per_s:.1f} tok/s at "
            f"batch {ev.schedule.batch} in M={ev.microbatches}; "
            + ", ".join(
                f"{s.device.ref} {s.device.bandwidth_gbps:.2f} GB/s {s.device.tflops:.3f} TFLOPS "
                f"t={t:.2f} ms"
                for s, t in zip(ev.stages, ev.stage_ms, strict=True)
            )
            + "; hops h="
            + " / ".join(f"{h:.3f}" for h in ev.schedule.hop_ms)
            + f" ms (cycle {ev.schedule.cycle_ms:.2f}, M x busiest {ev.microbatches * ev.schedule.busiest_ms:.2f})"
        )
    print(f"prediction basis: {prediction.basis}")
    print(
        f"re-plan (dry run, calibrated; not the prediction): {split(replanned)}, "
        f"step {replanned.step_ms:.2f} ms, {replanned.tokens_per_s:.1f} tok/s"
    )
    floor_1, floor_16 = floors
    print(
        f"pipeline floor (no API, no scheduler): {floor_1.tokens_per_s:.1f} tok/s at batch 1, "
        f"{floor_16.tokens_per_s:.1f} at {floor_16.batch} in M={floor_16.microbatches}; "
        f"its decode steps at {floor_16.batch}: p50 {floor_16.step_ms_p50:.1f} ms per "
        "micro-batch round, stage compute p50 "
        + " / ".join(f"{t:.1f}" for t in floor_16.stage_ms_p50)
        + " ms"
    )
    print(
        f"CPU over each phase, in cores ({os.cpu_count()} on this host): "
        + "; ".join(
            f"{p.clients} clients: " + ", ".join(f"{n} {c:.2f}" for n, c in p.cpu_s.items())
            for p in phases
        )
    )
    errors = sum(len(p.errors) for p in phases)
    for p in phases:
        for err in p.errors[:3]:
            print(f"error ({p.clients} clients): {err}")
    measured_16 = by[16].tokens_per_s
    figures: dict[str, Any] = {
        "model": MODEL,
        "tokens_per_request": tokens,
        "requests_per_client": requests,
        **{f"tokens_per_s_{c}": round(by[c].tokens_per_s, 2) for c in CONCURRENCY},
        "ttft_ms_p50_1": round(by[1].p50(by[1].ttft_ms), 1),
        "ttft_ms_p50_16": round(by[16].p50(by[16].ttft_ms), 1),
        "itl_ms_p50_1": round(by[1].p50(by[1].itl_ms), 2),
        "itl_ms_p50_16": round(by[16].p50(by[16].itl_ms), 2),
        "predicted_tokens_per_s_16": round(predicted_16, 2),
        "measured_over_predicted_16": round(measured_16 / predicted_16, 3)
        if predicted_16
        else None,
        "prediction_basis": prediction.basis,
        "placed_plan_tokens_per_s_16": round(placed.tokens_per_s, 2),
        "context_tokens": placed.context_tokens,
        "replan_tokens_per_s_16": round(replanned.tokens_per_s, 2) if replanned.ok else None,
        "pipeline_tokens_per_s_1": round(floor_1.tokens_per_s, 2),
        "pipeline_tokens_per_s_16": round(floor_16.tokens_per_s, 2),
        "pipeline_step_ms_p50_16": round(floor_16.step_ms_p50, 2),
        "pipeline_stage_ms_p50_16": [round(t, 2) for t in floor_16.stage_ms_p50],
        "cpu_cores_16": {n: round(c, 2) for n, c in by[16].cpu_s.items()},
        "over_pipeline_1": round(by[1].tokens_per_s / floor_1.tokens_per_s, 3)
        if floor_1.tokens_per_s
        else None,
        "over_pipeline_16": round(measured_16 / floor_16.tokens_per_s, 3)
        if floor_16.tokens_per_s
        else None,
        "errors": errors,
    }
    print(json.dumps(figures))
    return 0 if errors == 0 else 1


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench serve", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--tokens", type=int, default=None, help="per request (default 32, quick 12)"
    )
    parser.add_argument(
        "--requests", type=int, default=None, help="per client (default 2, quick 1)"
    )
    parser.add_argument("--blas-threads", type=int, default=1)
    args = parser.parse_args([a for a in (argv or []) if a != "--"])
    quick = quick or args.quick
    tokens: int = args.tokens or (12 if quick else 32)
    requests: int = args.requests or (1 if quick else 2)
    threads = str(args.blas_threads)
    # One BLAS thread per stage process: on a shared 2-core host, spinning OpenBLAS threads of a
    # waiting stage steal the core the working stage needs (see bench/pipeline.py).
    env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    for noisy in ("httpx", "httpx2", "openai"):  # a line per request would bury the table
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(run(tokens, requests, env))


if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
