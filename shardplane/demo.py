"""`shardplane demo`: the whole job in one command: start everything on the demo fleet, wait
for the devices, place a model, follow it to loaded and (optionally) generate with it.

Why its own module: the demo is orchestration only; every step it takes is another module's
(wiring, placing, status, models), and keeping it apart keeps that visible."""

from __future__ import annotations

import argparse
import asyncio
import time

from nats.aio.client import Client

from shardplane import render, secure
from shardplane.bus.ids import slug
from shardplane.bus.messages import InstanceState
from shardplane.models import run_generation
from shardplane.placing import follow_instance, request_with_retry
from shardplane.reach import connect_unless_stopped
from shardplane.status import wait_for_devices
from shardplane.wiring import (
    DEMO_FLEET,
    api_token_of,
    fleet_device_count,
    fleet_path,
    nats_for,
    run_all,
    run_command,
    stop_on_signals,
    until_stopped,
)


def demo(args: argparse.Namespace) -> int:
    async def main() -> int:
        started = time.monotonic()
        stop = asyncio.Event()
        stop_on_signals(stop)
        fleet = fleet_path(args, DEMO_FLEET)
        assert fleet is not None
        expected = fleet_device_count(fleet)
        async with nats_for(args.nats_url, not args.no_auth, fleet) as (url, creds):
            token = api_token_of(args)
            tasks = await run_all(args, url, stop, fleet, creds, token)
            client = (creds or {}).get(secure.CLIENT_ROLE)
            nc = await connect_unless_stopped(url, stop, "shardplane-demo", client)
            try:
                seen = await wait_for_devices(nc, expected, timeout=30, since=time.time() - 1.0)
                print(f"fleet {fleet.name}: {seen}/{expected} devices reporting", flush=True)
                # A fixed id keeps repeated demos idempotent instead of reserving again each run.
                body = {
                    "model": args.model,
                    "context_tokens": 8192,
                    "instance_id": "demo-" + slug(args.model, 40),
                }
                reply = await request_with_retry(nc, body, 30.0)
                print(render.placement(reply), flush=True)
                if reply.ok and reply.instance_id:
                    seen_states: dict[int, str] = {}

                    def changed(state: InstanceState) -> None:
                        for s in state.stages:
                            if seen_states.get(s.stage) != s.state:
                                seen_states[s.stage] = s.state
                                extra = f" ({s.reason})" if s.reason else ""
                                print(
                                    f"  stage {s.stage} on {s.device}: {s.state}{extra}", flush=True
                                )

                    final = await follow_instance(nc, reply.instance_id, 30.0, changed)
                    if final is not None:
                        print(f"instance {final.instance_id}: {final.state}")
                if args.generate:
                    await demo_generation(nc)
                    from shardplane.api.openai_compat import curl_line

                    base = f"http://127.0.0.1:{args.api_port}"
                    print(
                        f"\nask it over the OpenAI API:\n  {curl_line(base, DEMO_RUN.instance_id, token)}"
                    )
                print(
                    f"dashboard: http://127.0.0.1:{args.api_port}/   (ready in {time.monotonic() - started:.1f} s)",
                    flush=True,
                )
                if token:
                    print(f"API token for changes (Authorization: Bearer): {token}", flush=True)
            finally:
                await nc.close()
            if args.once:
                stop.set()
            else:
                print("serving; Ctrl-C stops", flush=True)
            code = await until_stopped(tasks, stop)
            return code if reply.ok else 1

    return run_command(main)


DEMO_RUN = argparse.Namespace(
    model="smollm2-135m",
    prompt="The capital of France is",
    token_ids=None,
    max_new_tokens=12,
    temperature=0.0,
    top_p=1.0,
    seed=0,
    min_stages=2,
    objective="throughput",
    instance_id="demo-smollm2-135m",
    context_tokens=2048,
)


async def demo_generation(nc: Client) -> None:
    """The demo's proof that plans run: SmolLM2 across several simulated devices (each stage
    computed on this host's CPU), measured beside the plan's prediction."""
    from shardplane.generate import GenerateError, summary

    print(f"\ngenerating with {DEMO_RUN.model} ({DEMO_RUN.prompt!r}):", flush=True)
    try:
        out = await run_generation(nc, DEMO_RUN, stream=True)
    except GenerateError as exc:
        print(f"\ngeneration failed: {exc}", flush=True)
        return
    print(f"\n{summary(out)}", flush=True)
    print(
        "  (simulated devices compute on this host's CPU, so measured >> the GPUs' prediction)",
        flush=True,
    )
