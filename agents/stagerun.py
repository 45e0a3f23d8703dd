"""Serve one stage of a model in its own process, without the placement machinery.

Why: the pipeline bench must measure stages in separate processes (as workers on different
machines would be) with nothing else running in them, and the failure tests must be able to
kill a stage the way a machine dies (SIGKILL), then start it again. Placed instances are served
by the shard worker (``agents.worker`` through ``agents.pipeline.PipelineHost``); this is the
same ``StageServer`` behind a command line.

    python -m shardplane.agents.stagerun --nats URL --model smollm2-135m \\
        --instance bench --stage 1 --layers 10:20 [--last]

Prints ``ready <subject>`` on stdout once it answers, and serves until SIGTERM/SIGINT. With
``--report-steps`` it also prints each step report a worker would publish in ``ShardStatus``
(``steps {json}``, from the same ``StepTimer``), so that a bench can calibrate from what the
stages measured, as the projector does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import nats

from shardplane.agents.loader import StageSpec
from shardplane.agents.pipeline import StageServer, build_backend, load_assigned
from shardplane.agents.steptiming import StepTiming
from shardplane.bus.messages import ShardAssignment


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="stagerun", description="Serve one stage of a model in its own process."
    )
    p.add_argument("--nats", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--instance", required=True)
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--layers", required=True, help="START:END, END exclusive")
    p.add_argument("--last", action="store_true", help="this stage applies the norm and head")
    p.add_argument(
        "--report-steps", action="store_true", help="print step reports as 'steps {json}' lines"
    )
    return p.parse_args(argv)


async def print_steps(timing: StepTiming) -> None:
    print("steps " + json.dumps(dataclasses.asdict(timing)), flush=True)


def read_steps(text: str) -> list[StepTiming]:
    """The step reports in a stage process's output (``--report-steps``)."""
    prefix = "steps "
    return [
        StepTiming(**json.loads(line[len(prefix) :]))
        for line in text.splitlines()
        if line.startswith(prefix)
    ]


async def serve(args: argparse.Namespace) -> None:
    start, end = (int(x) for x in args.layers.split(":"))
    assignment = ShardAssignment(
        instance_id=args.instance,
        generation=1,
        node="stagerun",
        model=args.model,
        stage=args.stage,
        layer_start=start,
        layer_end=end,
        embeddings=args.stage == 0,
        head=args.last,
    )
    spec = StageSpec(start, end, embeddings=assignment.embeddings, head=assignment.head)
    shard = await asyncio.to_thread(load_assigned, args.model, spec, use_cuda=False)
    backend = await asyncio.to_thread(build_backend, assignment, shard.tensors)
    nc = await nats.connect(args.nats)
    server = StageServer(
        nc,
        instance_id=args.instance,
        stage=args.stage,
        backend=backend,
        last=args.last,
        on_steps=print_steps if args.report_steps else None,
    )
    await server.start()
    await nc.flush()
    print(f"ready {server.subject}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    await nc.drain()


def spawn_stage(
    nats_url: str,
    model: str,
    instance: str,
    stage: int,
    start: int,
    end: int,
    *,
    last: bool,
    env: dict[str, str] | None = None,
    report_steps: bool = False,
) -> subprocess.Popen[str]:
    """Start a stage process (not waiting for it: see ``wait_ready``)."""
    cmd = [
        sys.executable,
        "-m",
        "shardplane.agents.stagerun",
        "--nats",
        nats_url,
        "--model",
        model,
        "--instance",
        instance,
        "--stage",
        str(stage),
        "--layers",
        f"{start}:{end}",
    ]
    cmd += (["--last"] if last else []) + (["--report-steps"] if report_steps else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True, env=env)


def wait_ready(procs: Sequence[subprocess.Popen[str]], timeout: float = 120.0) -> None:
    """Block until every process printed its ``ready`` line (or fail, naming the stage)."""
    deadline = time.monotonic() + timeout
    for i, proc in enumerate(procs):
        assert proc.stdout is not None
        line = proc.stdout.readline()  # loading takes seconds; a dead process gives EOF
        if not line.startswith("ready") or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"stage process {i} did not become ready (exit {proc.poll()})")


def spawn_split(
    nats_url: str,
    model: str,
    instance: str,
    bounds: Sequence[int],
    env: dict[str, str] | None = None,
    report_steps: bool = False,
) -> list[subprocess.Popen[str]]:
    """One process per stage of a model cut at ``bounds``, all ready when this returns."""
    last = len(bounds) - 2
    procs = [
        spawn_stage(
            nats_url,
            model,
            instance,
            i,
            bounds[i],
            bounds[i + 1],
            last=i == last,
            env=env,
            report_steps=report_steps,
        )
        for i in range(last + 1)
    ]
    try:
        wait_ready(procs)
    except BaseException:
        stop_all(procs)
        raise
    return procs


def stop_all(procs: Sequence[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
