"""`shardplane place`: ask the planner for a placement, render it, optionally export it for an
engine and wait until the instance is loaded.

Why its own module: placement requests (their body from the flags, retries, following an
instance until its stages settle) are also what `demo` and `generate` use; they are client-side
calls on `placement.request`, nothing to do with starting services."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError

from shardplane import render
from shardplane.bus import codec, keys, subjects
from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    InstanceState,
    NodeHeartbeat,
    NodeState,
    PlacementReply,
    PlacementRequest,
)
from shardplane.bus.streams import cluster_state
from shardplane.status import decoded
from shardplane.wiring import connect_briefly, run_command

if TYPE_CHECKING:
    from shardplane.planner.export import Facts


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    model: Any = args.model
    if model.lstrip().startswith("{"):
        model = json.loads(model)
    body: dict[str, Any] = {
        "model": model,
        "context_tokens": args.context_tokens,
        "batch": args.batch,
        "objective": args.objective,
        "dry_run": args.dry_run,
        "memory_headroom": args.memory_headroom,
        "exclude_nodes": args.exclude_nodes,
        "max_stages": args.max_stages,
        "microbatches": int(args.microbatches)
        if args.microbatches.isdigit()
        else args.microbatches,
        "min_stages": args.min_stages,
    }
    if args.instance_id:
        body["instance_id"] = args.instance_id
    if getattr(args, "export", None):
        # Each engine runs its own schedule: plan for the one the export is for.
        from shardplane.planner.schedule import engine_microbatches

        body["microbatches"] = engine_microbatches(args.export)
    return body


async def request_placement(
    nc: Client, body: dict[str, Any], timeout: float = 30.0
) -> PlacementReply:

    msg = await nc.request(subjects.PLACEMENT_REQUEST, json.dumps(body).encode(), timeout=timeout)
    return codec.decode(PlacementReply, msg.data, "json")


def place(args: argparse.Namespace) -> int:
    async def main() -> int:
        body = _request_from_args(args)
        try:
            msgspec.convert(body, PlacementRequest)
        except msgspec.ValidationError as exc:
            print(f"invalid request: {exc}", file=sys.stderr)
            return 2
        nc = await connect_briefly(args, "shardplane-place")
        try:
            try:
                reply = await request_placement(nc, body, args.timeout)
            except NoRespondersError:
                print(
                    f"shardplane: no planner answers on {subjects.PLACEMENT_REQUEST} "
                    "(is `shardplane planner` or `shardplane up` running against this NATS?)",
                    file=sys.stderr,
                )
                return 1
            except TimeoutError:
                print(
                    f"shardplane: the planner did not answer within {args.timeout:g} s "
                    "(--timeout to wait longer)",
                    file=sys.stderr,
                )
                return 1
            code = await _print_placement(nc, args, reply)
            if code == 0 and args.wait and reply.instance_id and not reply.dry_run:
                # With --json the bars go to stderr, so stdout stays one JSON document.
                out = sys.stderr if args.json else sys.stdout
                code = await wait_loaded(nc, reply.instance_id, args.wait_timeout, out)
            return code
        finally:
            await nc.close()

    return run_command(main)


async def _print_placement(nc: Client, args: argparse.Namespace, reply: PlacementReply) -> int:
    if args.json:
        print(codec.encode(reply, "json").decode())
    elif args.export:
        from shardplane.planner.export import ExportError, export_plan

        facts = await _export_facts(nc, reply)
        try:
            print(export_plan(reply, args.export, facts))
        except ExportError as exc:
            print(f"shardplane: cannot export for {args.export}: {exc}", file=sys.stderr)
            return 1
    else:
        print(render.placement(reply))
    return 0 if reply.ok else 1


async def _export_facts(nc: Client, reply: PlacementReply) -> Facts:
    """What the KV says about the planned devices and their nodes (vendor, address): only
    their keys are read, so a big fleet costs no more than a small one."""
    from shardplane.planner.export import Facts

    kv = await cluster_state(nc.jetstream())

    async def value(key: str) -> bytes | None:
        try:
            return (await kv.get(key)).value
        except Exception:  # a device or node with no state yet: exported without its facts
            return None

    devices: dict[str, DeviceSample] = {}
    nodes: dict[str, NodeHeartbeat] = {}
    for s in reply.stages:
        node, index = s.device.rsplit("/", 1)
        key = keys.device_key(node, int(index))
        if (device := decoded(DeviceState, key, await value(key))) is not None:
            devices[s.device] = device.sample
        key = keys.node_key(s.node)
        if s.node not in nodes and (state := decoded(NodeState, key, await value(key))):
            nodes[s.node] = state.heartbeat
    return Facts(devices=devices, nodes=nodes)


async def wait_loaded(nc: Client, instance: str, timeout: float, out: TextIO) -> int:
    """Follow ``instance`` with a progress bar per stage until every stage is loaded (or
    reserved) or failed: 0 when all loaded, 1 when any failed or the wait ran out. On a
    terminal the bars redraw in place; elsewhere each change prints them again."""
    live = out.isatty()
    colour = render.colour_enabled(out)
    drawn = 0

    def draw(state: InstanceState) -> None:
        nonlocal drawn
        lines = render.progress(state, colour=colour)
        if live and drawn:
            out.write(f"\x1b[{drawn}F\x1b[J")  # back to the first bar, clear below
        out.write("\n".join(lines) + "\n")
        out.flush()
        drawn = len(lines)

    final = await follow_instance(nc, instance, timeout, draw)
    if final is None or not all(s.state in SETTLED for s in final.stages):
        print(f"shardplane: {instance} had not settled after {timeout:g} s", file=sys.stderr)
        return 1
    failed = [s for s in final.stages if s.state == "failed"]
    for s in failed:
        print(f"shardplane: stage {s.stage} on {s.device} failed: {s.reason}", file=sys.stderr)
    return 1 if failed else 0


async def request_with_retry(nc: Client, body: dict[str, Any], timeout: float) -> PlacementReply:
    """The planner may still be subscribing when the demo asks: retry 'no responders' briefly."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await request_placement(nc, body, timeout)
        except NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


SETTLED = {"loaded", "reserved", "failed"}


async def follow_instance(
    nc: Client, instance: str, timeout: float, on_change: Callable[[InstanceState], None]
) -> InstanceState | None:
    """Print each change of ``instances.<id>`` until every stage has settled."""
    kv = await cluster_state(nc.jetstream())
    deadline = time.monotonic() + timeout
    last: InstanceState | None = None
    last_rev = -1
    while time.monotonic() < deadline:
        try:
            entry = await kv.get(keys.instance_key(instance))
        except Exception:
            await asyncio.sleep(0.1)
            continue
        if entry.value is not None and (entry.revision or 0) != last_rev:
            last_rev = entry.revision or 0
            state = decoded(InstanceState, keys.instance_key(instance), entry.value)
            if state is None:
                await asyncio.sleep(0.1)
                continue
            last = state
            on_change(last)
            if all(s.state in SETTLED for s in last.stages):
                return last
        await asyncio.sleep(0.1)
    return last
