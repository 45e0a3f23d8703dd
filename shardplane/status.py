"""`shardplane status`: read the projector's state (devices, nodes, instances) from JetStream
KV and render it as a table or JSON, once or watching.

Why its own module: reading and judging the cluster's state is a read-only client of the
projector's buckets; tests and `demo` wait on the same reads (`wait_for_devices`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import TypeVar

import msgspec
from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError

from shardplane import render
from shardplane.bus import codec, keys, kvfeed
from shardplane.bus.liveness import judge_device, judge_node, ttl_from_env
from shardplane.bus.messages import (
    DeviceState,
    InstanceState,
    NodeState,
)
from shardplane.bus.retry import retrying
from shardplane.bus.streams import CLUSTER_STATE, cluster_state
from shardplane.wiring import connect_briefly, log, run_command

T = TypeVar("T")


def decoded(kind: type[T], key: str, data: bytes | None) -> T | None:
    """One KV value, or None (with a warning naming the key) when it does not decode: one bad
    value must not hide the rest of the fleet."""
    if not data:
        return None
    try:
        return codec.decode(kind, data)
    except codec.DecodeError as exc:
        log.warning("skipping %s: undecodable value (%s)", key, exc)
        return None


async def read_state(nc: Client) -> tuple[list[DeviceState], list[NodeState], list[InstanceState]]:
    """Everything in ``cluster_state``, liveness judged on this machine's clock (a value the
    projector has not rewritten for a TTL is shown stale, not as it was last written)."""
    devices: list[DeviceState] = []
    nodes: list[NodeState] = []
    instances: list[InstanceState] = []
    js = nc.jetstream()
    try:
        await cluster_state(js)
    except BucketNotFoundError:  # nothing provisioned it yet: an empty cluster, not a crash
        return devices, nodes, instances
    values = await retrying(lambda: kvfeed.snapshot(js, CLUSTER_STATE), "reading cluster_state")
    for key, update in values.items():
        kind = keys.prefix(key)
        if kind == keys.DEVICES:
            devices.extend(filter(None, [decoded(DeviceState, key, update.value)]))
        elif kind == keys.NODES:
            nodes.extend(filter(None, [decoded(NodeState, key, update.value)]))
        elif kind == keys.INSTANCES:
            instances.extend(filter(None, [decoded(InstanceState, key, update.value)]))
    now, ttl = time.time(), ttl_from_env()
    nodes = [judge_node(n, now, ttl) for n in nodes]
    by_node = {n.heartbeat.node: n for n in nodes}
    devices = [judge_device(d, by_node.get(d.sample.node), now, ttl) for d in devices]
    devices.sort(key=lambda d: (d.sample.node, d.sample.index))
    nodes.sort(key=lambda n: n.heartbeat.node)
    return devices, nodes, instances


def _devices_table(devices: list[DeviceState], colour: bool = False) -> str:
    gib = render.GIB
    rows = [
        (
            f"{d.sample.node}/{d.sample.index}",
            d.sample.name or "?",
            render.paint("online", "green", colour)
            if d.online
            else render.paint(f"OFFLINE ({d.offline_reason or 'silent'})", "red", colour),
            f"{(d.sample.memory_free_bytes or 0) / gib:.1f}/{(d.sample.memory_total_bytes or 0) / gib:.1f}",
            f"{d.sample.utilization_gpu_pct:.0f}"
            if d.sample.utilization_gpu_pct is not None
            else "-",
            f"{d.sample.temperature_c:.0f}" if d.sample.temperature_c is not None else "-",
            f"{d.sample.power_w:.0f}" if d.sample.power_w is not None else "-",
            f"{d.sample.bandwidth_gbps:.0f}" if d.sample.bandwidth_gbps is not None else "-",
        )
        for d in devices
    ]
    return render.table(
        ("device", "GPU", "status", "free/total GiB", "util %", "temp C", "power W", "GB/s"), rows
    )


def _state_json(
    devices: list[DeviceState], nodes: list[NodeState], instances: list[InstanceState]
) -> str:
    return json.dumps(
        {
            "devices": [msgspec.to_builtins(d) for d in devices],
            "nodes": [msgspec.to_builtins(n) for n in nodes],
            "instances": [msgspec.to_builtins(i) for i in instances],
        },
        indent=2,
    )


def _state_text(
    devices: list[DeviceState],
    nodes: list[NodeState],
    instances: list[InstanceState],
    colour: bool = False,
) -> str:
    parts = [
        f"{len(nodes)} nodes, {len(devices)} devices, {len(instances)} instances\n",
        _devices_table(devices, colour),
    ]
    parts += [f"\n{render.instance(inst)}" for inst in instances]
    if not (devices or nodes or instances):
        parts.append("(nothing in the KV yet: is a projector running against this NATS?)")
    return "\n".join(parts)


def status(args: argparse.Namespace) -> int:
    async def main() -> int:
        nc = await connect_briefly(args, "shardplane-status")
        try:
            if args.watch:
                return await _watch(nc, args)
            devices, nodes, instances = await read_state(nc)
        finally:
            await nc.close()
        if args.json:
            print(_state_json(devices, nodes, instances))
        else:
            print(_state_text(devices, nodes, instances, render.colour_enabled(sys.stdout)))
        return 0

    code = run_command(main)
    # Ctrl-C is how a watch ends: that is success, not an interrupted command.
    return 0 if args.watch and code == 130 else code


async def _watch(nc: Client, args: argparse.Namespace) -> int:
    """Redraw the state every ``--interval`` seconds until Ctrl-C: on a terminal in place, like
    ``gpustat -i``; piped, one frame after another (``--json``: one document per line)."""
    live = sys.stdout.isatty()
    colour = render.colour_enabled(sys.stdout)
    while True:
        devices, nodes, instances = await read_state(nc)
        if args.json:
            frame = json.dumps(json.loads(_state_json(devices, nodes, instances)))
        else:
            stamp = time.strftime("%H:%M:%S")
            head = f"shardplane status  every {args.interval:g} s  {stamp}  (Ctrl-C quits)\n"
            frame = head + _state_text(devices, nodes, instances, colour)
        # Piped text frames are separated by a blank line; JSON frames are one per line.
        gap = "" if live or args.json else "\n"
        sys.stdout.write(("\x1b[H\x1b[2J" if live else "") + frame + "\n" + gap)
        sys.stdout.flush()
        await asyncio.sleep(args.interval)


async def wait_for_devices(nc: Client, expected: int, timeout: float, since: float = 0.0) -> int:
    """Poll the KV until ``expected`` devices are online with a sample newer than ``since``
    (a store kept from an earlier run still holds the old samples)."""
    js = nc.jetstream()
    await cluster_state(js)
    deadline = time.monotonic() + timeout
    fresh = 0
    while time.monotonic() < deadline:
        try:
            left = max(0.5, deadline - time.monotonic())  # a stuck replay ends with the wait
            values = await kvfeed.snapshot(js, CLUSTER_STATE, timeout=left)
        except Exception:
            values = {}
        fresh = 0
        for key, update in values.items():
            if keys.prefix(key) == keys.DEVICES:
                state = decoded(DeviceState, key, update.value)
                if state is not None:
                    fresh += state.online and state.sample.ts >= since
        if fresh >= expected:
            return fresh
        await asyncio.sleep(0.2)
    return fresh
