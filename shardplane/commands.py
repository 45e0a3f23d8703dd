"""The subcommands: thin async shells that wire the components to a NATS server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js.errors import BucketNotFoundError

from shardplane import render, supervise
from shardplane.bus import codec, subjects
from shardplane.bus.connect import nats_url
from shardplane.bus.ids import slug
from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    InstanceState,
    NodeHeartbeat,
    NodeState,
    PlacementReply,
    PlacementRequest,
)
from shardplane.bus.streams import cluster_state, provision
from shardplane.natsserver import PACKAGE_DIR, NatsServer, default_config, embedded_for
from shardplane.reach import NatsUnreachable, connect_unless_stopped

if TYPE_CHECKING:
    from shardplane.planner.export import Facts

log = logging.getLogger("shardplane")

DEMO_FLEET = PACKAGE_DIR / "fleets" / "demo.toml"

Service = Callable[[asyncio.Event], Awaitable[None]]


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def _serve(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command's body; one that was stopped before NATS ever answered says so and exits
    1, since nothing it was asked to do happened. A Ctrl-C that reaches a one-shot command
    (services turn it into their stop) ends it quietly with the shell's 130."""
    try:
        return asyncio.run(main())
    except NatsUnreachable as exc:
        print(f"shardplane: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130


def _fleet_path(args: argparse.Namespace, default: Path | None) -> Path | None:
    fleet: Path | None = getattr(args, "fleet", None)
    return fleet or default


def fleet_device_count(path: Path) -> int:
    from shardplane.agents.fleet import load

    return load(path).device_count()


async def run_services(
    url: str,
    stop: asyncio.Event,
    *,
    projector: bool = True,
    planner: bool = True,
    api: bool = True,
    fleet: Path | None = None,
    api_host: str = "127.0.0.1",
    api_port: int = 8080,
    interval_s: float | None = None,
    ttl_s: float | None = None,
    partition: tuple[int, int] | None = None,
) -> list[asyncio.Task[None]]:
    """Start the chosen components as tasks, each on its own connection.

    Raises NatsUnreachable when ``stop`` is set before NATS answers."""
    nc = await connect_unless_stopped(url, stop, "shardplane-provision")
    await provision(nc.jetstream())
    await nc.close()
    tasks: list[asyncio.Task[None]] = []

    async def run(name: str, body: Callable[[Client], Awaitable[None]]) -> None:
        client = await connect_unless_stopped(url, stop, f"shardplane-{name}")
        try:
            await body(client)
        except Exception:
            log.exception("%s stopped with an error", name)
            stop.set()
            raise
        finally:
            with contextlib.suppress(Exception):
                await client.drain()

    if projector:
        from shardplane.projector.partition import Partition
        from shardplane.projector.service import run_projector

        part = Partition(*partition) if partition else None
        tasks.append(
            asyncio.create_task(
                run(
                    "projector",
                    lambda c: run_projector(c, stop=stop, ttl_s=ttl_s, partition=part),
                )
            )
        )
    if planner:
        from shardplane.planner.service import run_planner

        tasks.append(asyncio.create_task(run("planner", lambda c: run_planner(c, stop=stop))))
    if api:
        from shardplane.api.server import run_api

        tasks.append(
            asyncio.create_task(
                run("api", lambda c: run_api(c, stop=stop, host=api_host, port=api_port))
            )
        )
    if fleet is not None:
        from shardplane.agents.service import run_agents

        tasks.append(
            asyncio.create_task(
                run(
                    "agents", lambda c: run_agents(c, stop=stop, fleet=fleet, interval_s=interval_s)
                )
            )
        )
    return tasks


async def _until_stopped(tasks: list[asyncio.Task[None]], stop: asyncio.Event) -> int:
    await stop.wait()
    done, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    failed = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
    for exc in failed:
        if isinstance(exc, NatsUnreachable):  # NATS went away before this component connected
            raise exc
    return 1 if failed else 0


@contextlib.asynccontextmanager
async def _nats_for(url: str | None):  # type: ignore[no-untyped-def]
    server = embedded_for(url)
    if server is None:
        yield nats_url(url)
        return
    log.info(
        "no NATS at %s; starting the embedded nats-server (store %s)", server.url, server.store_dir
    )
    async with server:
        # Its ports may not be the defaults (taken ones are skipped): say which they are.
        print(
            f"embedded nats-server: {server.url}, monitoring "
            f"http://127.0.0.1:{server.monitor_port}/, store {server.store_dir}",
            flush=True,
        )
        yield server.url


def up(args: argparse.Namespace) -> int:
    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        async with _nats_for(args.nats_url) as url:
            fleet = None if args.no_agents else _fleet_path(args, DEMO_FLEET)
            if fleet is not None and (kids := supervise.for_fleet(fleet, args)):
                print(
                    f"shardplane up: NATS {url}, dashboard http://{args.api_host}:{args.api_port}/"
                    f" ({len(kids)} processes)",
                    flush=True,
                )
                return await supervise.supervise(url, stop, kids)
            tasks = await run_services(
                url,
                stop,
                fleet=fleet,
                api_host=args.api_host,
                api_port=args.api_port,
                interval_s=args.interval,
            )
            print(
                f"shardplane up: NATS {url}, dashboard http://{args.api_host}:{args.api_port}/",
                flush=True,
            )
            return await _until_stopped(tasks, stop)

    return _serve(main)


def nats_server(args: argparse.Namespace) -> int:
    server = NatsServer(
        port=args.port,
        store_dir=args.store,
        config=args.config or default_config(),
        monitor_port=args.monitor_port,
    )
    # The child runs in its own session (a Ctrl-C in the terminal reaches only us), so every
    # way out from here on, a Ctrl-C during start() included, must stop it.
    try:
        server.start()
        print(
            f"nats-server (JetStream) on {server.url}, monitoring "
            f"http://127.0.0.1:{args.monitor_port}/, store {args.store}",
            flush=True,
        )
        assert server.proc is not None
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _single(component: str, args: argparse.Namespace) -> int:
    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        url = nats_url(args.nats_url)
        tasks = await run_services(
            url,
            stop,
            projector=component == "projector",
            planner=component == "planner",
            api=component == "api",
            fleet=None,
            api_host=getattr(args, "host", "127.0.0.1"),
            api_port=getattr(args, "port", 8080),
            ttl_s=getattr(args, "ttl", None),
            partition=getattr(args, "partition", None),
        )
        return await _until_stopped(tasks, stop)

    return _serve(main)


def projector(args: argparse.Namespace) -> int:
    return _single("projector", args)


def planner(args: argparse.Namespace) -> int:
    return _single("planner", args)


def api(args: argparse.Namespace) -> int:
    return _single("api", args)


def agent(args: argparse.Namespace) -> int:
    async def main() -> int:
        from shardplane.agents.service import run_agents

        stop = asyncio.Event()
        _stop_on_signals(stop)
        nc = await connect_unless_stopped(nats_url(args.nats_url), stop, "shardplane-agent")
        await provision(nc.jetstream())
        try:
            await run_agents(
                nc,
                stop=stop,
                fleet=args.fleet,
                node=args.node,
                interval_s=args.interval,
                cpu_device=args.cpu_device,
                temperature=not args.no_temperature,
                power=not args.no_power,
                part=args.part,
            )
        finally:
            await nc.drain()
        return 0

    return _serve(main)


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
    }
    if args.instance_id:
        body["instance_id"] = args.instance_id
    return body


async def request_placement(
    nc: Client, body: dict[str, Any], timeout: float = 30.0
) -> PlacementReply:
    msg = await nc.request(subjects.PLACEMENT_REQUEST, json.dumps(body).encode(), timeout=timeout)
    return codec.decode(PlacementReply, msg.data, "json")


async def connect_briefly(args: argparse.Namespace, name: str) -> Client:
    """A one-shot command's connection: unlike a service, it gives up after
    ``--connect-timeout`` (or on Ctrl-C) with the URL and the reason (NatsUnreachable)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _stop_on_signals(stop)
    timer = loop.call_later(args.connect_timeout, stop.set)
    try:
        return await connect_unless_stopped(nats_url(args.nats_url), stop, name)
    finally:
        timer.cancel()
        # Nothing watches ``stop`` after this: Ctrl-C and SIGTERM act as usual again.
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


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

    return _serve(main)


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
        if (raw := await value(subjects.device_key(node, int(index)))) is not None:
            devices[s.device] = codec.decode(DeviceState, raw).sample
        if s.node not in nodes and (raw := await value(subjects.node_key(s.node))) is not None:
            nodes[s.node] = codec.decode(NodeState, raw).heartbeat
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


async def read_state(nc: Client) -> tuple[list[DeviceState], list[NodeState], list[InstanceState]]:
    devices: list[DeviceState] = []
    nodes: list[NodeState] = []
    instances: list[InstanceState] = []
    try:
        kv = await cluster_state(nc.jetstream())
    except BucketNotFoundError:  # nothing provisioned it yet: an empty cluster, not a crash
        return devices, nodes, instances
    try:
        keys = await kv.keys()
    except Exception:  # nats raises NoKeysError on an empty bucket
        keys = []
    for key in keys:
        entry = await kv.get(key)
        if entry.value is None:
            continue
        if key.startswith("devices."):
            devices.append(codec.decode(DeviceState, entry.value))
        elif key.startswith("nodes."):
            nodes.append(codec.decode(NodeState, entry.value))
        elif key.startswith("instances."):
            instances.append(codec.decode(InstanceState, entry.value))
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

    code = _serve(main)
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
    kv = await cluster_state(nc.jetstream())
    deadline = time.monotonic() + timeout
    fresh = 0
    while time.monotonic() < deadline:
        try:
            keys = [k for k in await kv.keys() if k.startswith("devices.")]
        except Exception:
            keys = []
        fresh = 0
        for key in keys:
            entry = await kv.get(key)
            if entry.value is not None:
                state = codec.decode(DeviceState, entry.value)
                fresh += state.online and state.sample.ts >= since
        if fresh >= expected:
            return fresh
        await asyncio.sleep(0.2)
    return fresh


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
            entry = await kv.get(subjects.instance_key(instance))
        except Exception:
            await asyncio.sleep(0.1)
            continue
        if entry.value is not None and (entry.revision or 0) != last_rev:
            last_rev = entry.revision or 0
            last = codec.decode(InstanceState, entry.value)
            on_change(last)
            if all(s.state in SETTLED for s in last.stages):
                return last
        await asyncio.sleep(0.1)
    return last


def demo(args: argparse.Namespace) -> int:
    async def main() -> int:
        started = time.monotonic()
        stop = asyncio.Event()
        _stop_on_signals(stop)
        fleet = _fleet_path(args, DEMO_FLEET)
        assert fleet is not None
        expected = fleet_device_count(fleet)
        async with _nats_for(args.nats_url) as url:
            tasks = await run_services(
                url, stop, fleet=fleet, api_port=args.api_port, interval_s=args.interval
            )
            nc = await connect_unless_stopped(url, stop, "shardplane-demo")
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
                print(
                    f"dashboard: http://127.0.0.1:{args.api_port}/   (ready in {time.monotonic() - started:.1f} s)",
                    flush=True,
                )
            finally:
                await nc.close()
            if args.once:
                stop.set()
            else:
                print("serving; Ctrl-C stops", flush=True)
            code = await _until_stopped(tasks, stop)
            return code if reply.ok else 1

    return _serve(main)


def models(args: argparse.Namespace) -> int:
    from shardplane.planner.catalog import CATALOG, catalog_table
    from shardplane.planner.profile import card_params, profile_from_card

    if not args.json:
        print(catalog_table())
        return 0
    rows: list[dict[str, Any]] = []
    for c in CATALOG.values():
        profile = profile_from_card(c)
        row: dict[str, Any] = msgspec.to_builtins(c)
        # The table's derived columns, in base units.
        row["params"] = card_params(c)
        row["weight_bytes"] = profile.weight_bytes
        row["kv_bytes_per_token"] = sum(profile.kv_bytes_per_token)
        rows.append(row)
    print(json.dumps(rows, indent=2))
    return 0
