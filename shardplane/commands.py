"""The subcommands: thin async shells that wire the components to a NATS server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar
from urllib.parse import urlparse

import msgspec
import nats
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError, NoKeysError

from shardplane import render, secure, supervise
from shardplane.bus import codec, keys, subjects
from shardplane.bus.connect import nats_url
from shardplane.bus.ids import slug
from shardplane.bus.liveness import judge_device, judge_node, ttl_from_env
from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    InstanceState,
    NodeHeartbeat,
    NodeState,
    PlacementReply,
    PlacementRequest,
)
from shardplane.bus.retry import retrying
from shardplane.bus.streams import REPLICAS_ENV, cluster_state, provision
from shardplane.natsserver import PACKAGE_DIR, NatsServer, default_config, embedded_for
from shardplane.reach import NatsUnreachable, connect_unless_stopped

if TYPE_CHECKING:
    from shardplane.planner.export import Facts

log = logging.getLogger("shardplane")

DEMO_FLEET = PACKAGE_DIR / "fleets" / "demo.toml"

Service = Callable[[asyncio.Event], Awaitable[None]]
T = TypeVar("T")


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
    except (secure.AuthError, secure.InsecureBinding) as exc:  # bad creds; API open to all
        print(f"shardplane: {exc}", file=sys.stderr, flush=True)
        return 2
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
    controller: bool = True,
    fleet: Path | None = None,
    workers: bool = True,
    api_host: str = "127.0.0.1",
    api_port: int = 8080,
    interval_s: float | None = None,
    ttl_s: float | None = None,
    creds: Mapping[str, Path] | None = None,
    api_token: str | None = None,
    partition: tuple[int, int] | None = None,
) -> list[asyncio.Task[None]]:
    """Start the chosen components as tasks, each on its own connection (with ``creds``, each
    as its role, after the admin provisioned the bus).

    Raises NatsUnreachable when ``stop`` is set before NATS answers."""
    roles: Mapping[str, Path] = creds or {}
    await _provision_once(url, stop, creds)
    tasks: list[asyncio.Task[None]] = []

    async def run(name: str, body: Callable[[Client], Awaitable[None]]) -> None:
        role = "agent" if name == "agents" else name
        client = await connect_unless_stopped(url, stop, f"shardplane-{name}", roles.get(role))
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
    if controller:
        from shardplane.planner.controller import run_controller

        tasks.append(asyncio.create_task(run("controller", lambda c: run_controller(c, stop=stop))))
    if api:
        from shardplane.api.server import run_api

        tasks.append(
            asyncio.create_task(
                run(
                    "api",
                    lambda c: run_api(c, stop=stop, host=api_host, port=api_port, token=api_token),
                )
            )
        )
    if fleet is not None:
        from shardplane.agents.service import run_agents

        async def agents(c: Client) -> None:
            # With roles, the workers connect as `worker`: the agent may only publish telemetry.
            worker_nc = None
            if "worker" in roles and workers:
                worker_nc = await connect_unless_stopped(
                    url, stop, "shardplane-workers", roles["worker"]
                )
            try:
                await run_agents(
                    c,
                    stop=stop,
                    fleet=fleet,
                    interval_s=interval_s,
                    worker_nc=worker_nc,
                    workers=workers,
                )
            finally:
                if worker_nc is not None:
                    with contextlib.suppress(Exception):
                        await worker_nc.drain()

        tasks.append(asyncio.create_task(run("agents", agents)))
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
async def _nats_for(
    url: str | None, secured: bool = False, fleet: Path | None = None, cluster: int = 0
):
    """(URL, role credentials or None). ``secured``: an embedded server (or local cluster) runs
    with the role users of ``data/auth`` (generated on first start), and a running one is
    spoken to with them when that folder has them and the environment names no credentials.
    ``cluster`` > 1: a local cluster of that many servers instead of one."""
    if cluster > 1:
        from shardplane.cluster import NatsCluster

        layout = cluster_layout(url)
        cluster_creds: dict[str, Path] | None = None
        if secured:
            nodes = tuple(n.name for n in _fleet_nodes(fleet))
            layout["config"] = secure.prepare(secure.AUTH_DIR, layout["config"], nodes)
            cluster_creds = secure.role_creds(secure.AUTH_DIR)
        servers = NatsCluster(cluster, **layout)
        log.info(
            "starting a local NATS cluster of %d (stores under %s)", cluster, servers.store_root
        )
        async with servers:
            yield servers.url, cluster_creds
        return
    server = embedded_for(url)
    creds: dict[str, Path] | None = None
    if secured:
        nodes = tuple(n.name for n in _fleet_nodes(fleet))
        if server is not None:
            server.config = secure.prepare(secure.AUTH_DIR, server.config, nodes)
            creds = secure.role_creds(secure.AUTH_DIR)
        elif secure.client_creds() is not None:
            creds = secure.role_creds(secure.AUTH_DIR)
    if server is None:
        yield nats_url(url), creds
        return
    log.info(
        "no NATS at %s; starting the embedded nats-server (store %s%s)",
        server.url,
        server.store_dir,
        ", role users" if creds else "",
    )
    async with server:
        # Its ports may not be the defaults (taken ones are skipped): say which they are.
        print(
            f"embedded nats-server: {server.url}, monitoring "
            f"http://127.0.0.1:{server.monitor_port}/, store {server.store_dir}",
            flush=True,
        )
        yield server.url, creds


def _fleet_nodes(fleet: Path | None) -> list[Any]:
    if fleet is None:
        return []
    from shardplane.agents.fleet import load

    return list(load(fleet).nodes)


async def _provision_once(
    url: str, stop: asyncio.Event, creds: Mapping[str, Path] | None, partitions: int = 1
) -> None:
    """Provision the bus before separate service processes start: as ``admin`` when the bus
    has roles (no other role may create streams or buckets), else as anyone; with the
    projector partitions' stream when there are several."""
    from shardplane.projector import partition

    roles: Mapping[str, Path] = creds or {}
    nc = await connect_unless_stopped(url, stop, "shardplane-provision", roles.get("admin"))
    try:
        if creds:
            await secure.admin_provision(nc, partitions)
        else:
            await provision(nc.jetstream())
            if partitions > 1:
                await partition.provision(nc, partitions)
    finally:
        await nc.close()


def _api_token(args: argparse.Namespace) -> str | None:
    return secure.env_token() if args.no_auth else secure.api_token(secure.AUTH_DIR)


def cluster_layout(url: str | None) -> dict[str, Any]:
    """Where a local cluster goes: client ports from the first port of ``url`` (4222 by
    default) up, routes 100 above, monitoring from 8222 up, stores under data/nats-cluster."""
    first = nats_url(url).split(",")[0]
    port = urlparse(first if "://" in first else f"nats://{first}").port or 4222
    return {
        "base_port": port,
        "store_root": Path("data") / "nats-cluster",
        "config": default_config(),
        "monitor_base_port": 8222 if port == 4222 else None,
    }


def provision_replicas(url: str, replicas: int | None) -> None:
    """``nats --replicas N``: provision every stream and bucket at N now (raising existing
    ones; never lowering), so services started later find them so."""
    if replicas is None:
        return

    async def main() -> None:
        nc = await nats.connect(servers=url.split(","), connect_timeout=5)
        try:
            await provision(nc.jetstream(), replicas)
        finally:
            await nc.close()

    asyncio.run(main())


def _replicas(args: argparse.Namespace) -> None:
    """``--replicas`` is ``SHARDPLANE_REPLICAS`` for every component started from here."""
    replicas: int | None = getattr(args, "replicas", None)
    if replicas is not None:
        os.environ[REPLICAS_ENV] = str(replicas)


def up(args: argparse.Namespace) -> int:
    _replicas(args)

    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        fleet = None if args.no_agents else _fleet_path(args, DEMO_FLEET)
        token = _api_token(args)
        secure.check_binding(args.api_host, token)  # before anything starts
        async with _nats_for(args.nats_url, not args.no_auth, fleet, args.cluster) as (
            url,
            creds,
        ):
            if kids := supervise.for_fleet(fleet, args, creds):
                await _provision_once(url, stop, creds, supervise.partitions_of(kids))
                if token:  # the API child reads it from its environment
                    os.environ[secure.TOKEN_ENV] = token
                print(
                    f"shardplane up: NATS {url}, dashboard http://{args.api_host}:{args.api_port}/"
                    f" ({len(kids)} processes)"
                    + (f" (API token for changes: {token})" if token else ""),
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
                creds=creds,
                api_token=token,
            )
            print(
                f"shardplane up: NATS {url}, dashboard http://{args.api_host}:{args.api_port}/"
                + (f" (API token for changes: {token})" if token else ""),
                flush=True,
            )
            return await _until_stopped(tasks, stop)

    return _serve(main)


def nats_server(args: argparse.Namespace) -> int:
    _replicas(args)
    config = args.config or default_config()
    if args.auth_dir is not None:
        config = secure.prepare(args.auth_dir, config, ())
    if args.cluster > 1:
        from shardplane.cluster import NatsCluster, serve_cluster

        return serve_cluster(
            NatsCluster(
                args.cluster,
                base_port=args.port,
                store_root=args.store or Path("data") / "nats-cluster",
                config=config,
                monitor_base_port=args.monitor_port,
            ),
            replicas=args.replicas,
        )
    server = NatsServer(
        port=args.port,
        store_dir=args.store or Path("data") / "nats",
        config=config,
        monitor_port=args.monitor_port,
    )
    # The child runs in its own session (a Ctrl-C in the terminal reaches only us), so every
    # way out from here on, a Ctrl-C during start() included, must stop it.
    try:
        server.start()
        provision_replicas(server.url, args.replicas)
        print(
            f"nats-server (JetStream) on {server.url}, monitoring "
            f"http://127.0.0.1:{args.monitor_port}/, store {server.store_dir}",
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
        if component == "api":
            secure.check_binding(args.host, secure.env_token())  # before anything starts
        tasks = await run_services(
            url,
            stop,
            projector=component == "projector",
            planner=component == "planner",
            api=component == "api",
            controller=component == "controller",
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


def controller(args: argparse.Namespace) -> int:
    return _single("controller", args)


def agent(args: argparse.Namespace) -> int:
    async def main() -> int:
        from shardplane.agents.service import run_agents

        stop = asyncio.Event()
        _stop_on_signals(stop)
        url = nats_url(args.nats_url)
        nc = await connect_unless_stopped(url, stop, "shardplane-agent")
        await provision(nc.jetstream())
        workers = None
        if args.worker_creds is not None:
            workers = await connect_unless_stopped(
                url, stop, "shardplane-worker", args.worker_creds
            )
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
                worker_nc=workers,
                part=args.part,
            )
        finally:
            if workers is not None:
                await workers.drain()
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


async def connect_briefly(args: argparse.Namespace, name: str) -> Client:
    """A one-shot command's connection: unlike a service, it gives up after
    ``--connect-timeout`` (or on Ctrl-C) with the URL and the reason (NatsUnreachable)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _stop_on_signals(stop)
    timer = loop.call_later(args.connect_timeout, stop.set)
    try:
        return await connect_unless_stopped(
            nats_url(args.nats_url), stop, name, secure.client_creds()
        )
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
    try:
        kv = await cluster_state(nc.jetstream())
    except BucketNotFoundError:  # nothing provisioned it yet: an empty cluster, not a crash
        return devices, nodes, instances
    try:
        names = await retrying(lambda: kv.keys(), "listing cluster_state")
    except NoKeysError:  # an empty bucket
        names = []
    for key in names:
        try:
            entry = await retrying(lambda k=key: kv.get(k), "reading cluster_state")
        except (KeyNotFoundError, KeyDeletedError):
            continue  # deleted between the listing and the read
        kind = keys.prefix(key)
        if kind == keys.DEVICES:
            devices.extend(filter(None, [decoded(DeviceState, key, entry.value)]))
        elif kind == keys.NODES:
            nodes.extend(filter(None, [decoded(NodeState, key, entry.value)]))
        elif kind == keys.INSTANCES:
            instances.extend(filter(None, [decoded(InstanceState, key, entry.value)]))
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
            names = [k for k in await kv.keys() if keys.prefix(k) == keys.DEVICES]
        except Exception:
            names = []
        fresh = 0
        for key in names:
            with contextlib.suppress(KeyNotFoundError, KeyDeletedError):
                entry = await kv.get(key)
                state = decoded(DeviceState, key, entry.value)
                if state is not None:
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


def demo(args: argparse.Namespace) -> int:
    async def main() -> int:
        started = time.monotonic()
        stop = asyncio.Event()
        _stop_on_signals(stop)
        fleet = _fleet_path(args, DEMO_FLEET)
        assert fleet is not None
        expected = fleet_device_count(fleet)
        async with _nats_for(args.nats_url, not args.no_auth, fleet) as (url, creds):
            token = _api_token(args)
            tasks = await run_services(
                url,
                stop,
                fleet=fleet,
                api_port=args.api_port,
                interval_s=args.interval,
                creds=creds,
                api_token=token,
            )
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
            code = await _until_stopped(tasks, stop)
            return code if reply.ok else 1

    return _serve(main)


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


def _generate_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "context_tokens": args.context_tokens,
        "instance_id": args.instance_id or "gen-" + slug(args.model, 40),
        "objective": getattr(args, "objective", "throughput"),
    }
    if args.min_stages is not None:
        body["min_stages"] = args.min_stages
    return body


async def run_generation(
    nc: Client, args: argparse.Namespace, *, stream: bool, timeout: float = 30.0
) -> Any:
    """Place (or re-place) the model, then generate; returns ``shardplane.generate.Outcome``."""
    from shardplane.generate import GenerateError, TextCodec, generate

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise GenerateError(
            f"--max-new-tokens must be >= 1 (got {args.max_new_tokens}), --temperature >= 0 "
            f"(got {args.temperature:g}), --top-p in (0, 1] (got {args.top_p:g})"
        )
    text = TextCodec(args.model)
    if args.token_ids is not None:
        try:
            prompt = [int(t) for t in args.token_ids.split(",") if t.strip()]
        except ValueError:
            raise GenerateError(
                f"--token-ids must be integers separated by commas: {args.token_ids!r}"
            ) from None
    else:
        prompt = text.encode(args.prompt)
    if not prompt:
        raise GenerateError("the prompt has no tokens")
    reply = await request_with_retry(nc, _generate_body(args), timeout)
    if not reply.ok:
        raise GenerateError(
            f"placement failed: {reply.error.message if reply.error else reply.status}"
        )
    if args.min_stages and len(reply.stages) < args.min_stages:
        # A planner that predates min_stages ignores it; say so rather than pretend.
        print(
            f"note: the planner placed {len(reply.stages)} stage(s) although --min-stages "
            f"{args.min_stages} was asked (this planner does not honour min_stages)",
            file=sys.stderr,
        )
    if stream:
        where = ", ".join(f"{s.device} [{s.layer_start},{s.layer_end})" for s in reply.stages)
        print(
            f"{reply.instance_id}: {len(reply.stages)} stage(s): {where}",
            file=sys.stderr,
            flush=True,
        )
    decoded: list[int] = []
    shown = ""

    def show(tokens: list[int]) -> None:
        nonlocal shown
        decoded.extend(tokens)
        now = text.decode(decoded)
        piece = now[len(shown) :] if now is not None else " ".join(map(str, tokens)) + " "
        shown = now if now is not None else shown
        print(piece, end="", flush=True)

    out = await generate(
        nc,
        reply,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_ids=text.eos,
        on_tokens=show if stream else None,
    )
    out.text = text.decode(out.token_ids)
    return out


def generate(args: argparse.Namespace) -> int:
    from shardplane.generate import GenerateError, json_line, summary

    async def main() -> int:
        nc = await connect_briefly(args, "shardplane-generate")
        try:
            out = await run_generation(nc, args, stream=not args.json, timeout=args.timeout)
        except GenerateError as exc:
            print(f"\nshardplane: {exc}", file=sys.stderr)
            return 1
        except NoRespondersError:
            print(
                f"shardplane: no planner answers on {subjects.PLACEMENT_REQUEST}", file=sys.stderr
            )
            return 1
        except TimeoutError:
            print(
                f"shardplane: the planner did not answer within {args.timeout:g} s", file=sys.stderr
            )
            return 1
        finally:
            await nc.close()
        if args.json:
            print(json_line(out))
        else:
            print()
            print(summary(out))
        return 0

    return _serve(main)
