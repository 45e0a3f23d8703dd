"""What every command shares: running the components in one process, the NATS they need
(a running one, the embedded server, a local cluster; with role credentials or not), signals
and exit codes.

Why apart from the commands: `up`, `demo`, the single-service commands, tests and benchmarks
all start services the same way; one place keeps them starting alike."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nats
from nats.aio.client import Client

from shardplane import secure
from shardplane.bus.connect import nats_url
from shardplane.bus.streams import REPLICAS_ENV, provision
from shardplane.natsserver import PACKAGE_DIR, default_config, embedded_for
from shardplane.reach import NatsUnreachable, connect_unless_stopped

log = logging.getLogger("shardplane")

DEMO_FLEET = PACKAGE_DIR / "fleets" / "demo.toml"

Service = Callable[[asyncio.Event], Awaitable[None]]


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def run_command(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
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


def fleet_path(args: argparse.Namespace, default: Path | None) -> Path | None:
    fleet: Path | None = getattr(args, "fleet", None)
    return fleet or default


def fleet_device_count(path: Path) -> int:
    from shardplane.agents.fleet import load

    return load(path).device_count()


async def run_all(
    args: argparse.Namespace,
    url: str,
    stop: asyncio.Event,
    fleet: Path | None,
    creds: Mapping[str, Path] | None,
    token: str | None,
) -> list[asyncio.Task[None]]:
    """Every component in this process, as the options ``up`` and ``demo`` share ask for (the
    API's port and host, the agents' interval), with ``fleet`` simulated."""
    return await run_services(
        url,
        stop,
        fleet=fleet,
        api_host=getattr(args, "api_host", "127.0.0.1"),
        api_port=args.api_port,
        interval_s=args.interval,
        creds=creds,
        api_token=token,
    )


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
    await provision_once(url, stop, creds)
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


async def until_stopped(tasks: list[asyncio.Task[None]], stop: asyncio.Event) -> int:
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
async def nats_for(
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


async def provision_once(
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


def api_token_of(args: argparse.Namespace) -> str | None:
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


def replicas_to_env(args: argparse.Namespace) -> None:
    """``--replicas`` is ``SHARDPLANE_REPLICAS`` for every component started from here."""
    replicas: int | None = getattr(args, "replicas", None)
    if replicas is not None:
        os.environ[REPLICAS_ENV] = str(replicas)


async def connect_briefly(args: argparse.Namespace, name: str) -> Client:
    """A one-shot command's connection: unlike a service, it gives up after
    ``--connect-timeout`` (or on Ctrl-C) with the URL and the reason (NatsUnreachable)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_on_signals(stop)
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
