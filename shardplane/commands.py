"""The service subcommands (`up`, `nats`, `projector`, `planner`, `api`, `controller`, `agent`):
thin async shells that start components against a NATS server.

Why only these here: each starts something that runs until stopped; the one-shot commands
(placing, status, demo, models) live in their own modules, and what every command shares
(signals, exit codes, the embedded NATS) lives in `shardplane.wiring`. The names tests and
benchmarks import from here are re-exported."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from shardplane import secure, supervise
from shardplane.bus.connect import nats_url
from shardplane.bus.streams import provision
from shardplane.natsserver import NatsServer, default_config
from shardplane.placing import request_placement as request_placement
from shardplane.reach import connect_unless_stopped
from shardplane.status import wait_for_devices as wait_for_devices
from shardplane.wiring import (
    DEMO_FLEET,
    api_token_of,
    fleet_path,
    nats_for,
    provision_once,
    provision_replicas,
    replicas_to_env,
    run_all,
    run_command,
    run_services,
    stop_on_signals,
    until_stopped,
)
from shardplane.wiring import fleet_device_count as fleet_device_count


def up(args: argparse.Namespace) -> int:
    replicas_to_env(args)

    async def main() -> int:
        stop = asyncio.Event()
        stop_on_signals(stop)
        fleet = None if args.no_agents else fleet_path(args, DEMO_FLEET)
        token = api_token_of(args)
        secure.check_binding(args.api_host, token)  # before anything starts
        async with nats_for(args.nats_url, not args.no_auth, fleet, args.cluster) as (
            url,
            creds,
        ):
            if kids := supervise.for_fleet(fleet, args, creds):
                await provision_once(url, stop, creds, supervise.partitions_of(kids))
                if token:  # the API child reads it from its environment
                    os.environ[secure.TOKEN_ENV] = token
                print(
                    f"shardplane up: NATS {url}, dashboard http://{args.api_host}:{args.api_port}/"
                    f" ({len(kids)} processes)"
                    + (f" (API token for changes: {token})" if token else ""),
                    flush=True,
                )
                return await supervise.supervise(url, stop, kids)
            tasks = await run_all(args, url, stop, fleet, creds, token)
            print(
                f"shardplane up: NATS {url}, dashboard http://{args.api_host}:{args.api_port}/"
                + (f" (API token for changes: {token})" if token else ""),
                flush=True,
            )
            return await until_stopped(tasks, stop)

    return run_command(main)


def nats_server(args: argparse.Namespace) -> int:
    replicas_to_env(args)
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
        stop_on_signals(stop)
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
        return await until_stopped(tasks, stop)

    return run_command(main)


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
        stop_on_signals(stop)
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

    return run_command(main)
