"""``run_agents``: the agent service. With a fleet file it runs every simulated node of the fleet
in this one process (or just ``node``); without one it runs this host's agent on the first GPU
backend that answers (NVML, ROCm SMI) or with zero devices. Each node also runs its shard
worker (``agents.worker.run_worker``) when ``workers`` is on.

Simulated nodes take fault commands on ``sim.fault.<node>`` (core NATS request-reply, JSON or
MessagePack body ``{"kind": "vanish", "device": 1, "duration_s": 10}``), e.g.
``nats req sim.fault.rig-b '{"kind":"throttle","device":0}'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from shardplane.agents import fleet as fleet_mod
from shardplane.agents.assignments import AssignmentFeed
from shardplane.agents.backend import Backend
from shardplane.agents.collector import (
    CollectorConfig,
    NodeCollector,
    boot_id,
    final_heartbeats,
    run_collectors,
)
from shardplane.agents.cpu import HostCpuDevice, SimCpuDevice, WithCpuDevice
from shardplane.agents.factory import select_backend
from shardplane.agents.hostinfo import HostInfo, fastest_gbps, this_host
from shardplane.agents.publisher import Publisher
from shardplane.agents.sim import Fault, SimNode
from shardplane.bus import subjects
from shardplane.bus.codec import sniff_encoding
from shardplane.bus.ids import node_id, node_id_from_hostname
from shardplane.bus.messages import NetInterface, NetLink
from shardplane.bus.streams import provision

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0

HoldMemory = Callable[[int, int], None]
WorkerFn = Callable[..., Awaitable[None]]


def _worker_fn() -> WorkerFn | None:
    """The shard worker, when its module is there (it is developed alongside this one)."""
    try:
        from shardplane.agents.worker import run_worker
    except ImportError as exc:
        log.warning("shard workers disabled: agents.worker is not importable (%s)", exc)
        return None
    fn: WorkerFn = run_worker
    return fn


def sim_collectors(
    fleet: fleet_mod.Fleet,
    publisher: Publisher,
    config: CollectorConfig,
    *,
    only: str | None = None,
    cpu_device: bool = False,
    epoch: float | None = None,
    part: tuple[int, int] | None = None,
) -> tuple[list[NodeCollector], dict[str, SimNode]]:
    """A collector per simulated node of ``fleet`` (or only ``only``; or, with ``part`` =
    ``(i, k)``, every k-th node from the i-th, so k processes share a fleet)."""
    epoch = time.time() if epoch is None else epoch
    boot = boot_id(epoch)
    specs = [s for s in fleet.nodes if only is None or s.name == only]
    if part is not None:
        index, count = part
        if not 0 <= index < count:
            raise ValueError(f"part {index} of {count}: the index must be in 0..{count - 1}")
        specs = specs[index::count]
    if only is not None and not specs:
        raise ValueError(f"node {only!r} is not in the fleet file")
    collectors: list[NodeCollector] = []
    sims: dict[str, SimNode] = {}
    table = fleet_mod.link_table(fleet)
    net = fleet.network
    for spec in specs:
        sim = SimNode(spec, fleet)
        sims[spec.name] = sim
        backend: Backend = sim
        if cpu_device:
            backend = WithCpuDevice(
                sim,
                SimCpuDevice(
                    spec.name, spec.host_memory_bytes, spec.cpu_bandwidth_gbps, spec.cpu_count
                ),
            )
        peers = fleet_mod.peer_links(fleet, spec.name, table)
        links = tuple(NetLink(peer=p, gbps=g, latency_ms=lat) for p, g, lat in peers)
        nic_gbps = max([net.default_gbps, *(g for _, g, _ in peers)])
        host = HostInfo(
            hostname=spec.name,
            cpu_count=spec.cpu_count,
            host_memory_bytes=spec.host_memory_bytes,
            interfaces=(NetInterface(name="eth0", speed_mbps=nic_gbps * 1000.0),),
        )
        collectors.append(
            NodeCollector(
                node=spec.name,
                backend=backend,
                host=host,
                publisher=publisher,
                config=config,
                boot=boot,
                epoch=epoch,
                links=links,
                default_link_gbps=net.default_gbps,
                default_link_latency_ms=net.default_latency_ms,
            )
        )
    return collectors, sims


def host_collector(
    publisher: Publisher,
    config: CollectorConfig,
    *,
    node: str | None,
    cpu_device: bool,
    epoch: float | None = None,
    nats_url: str | None = None,
) -> NodeCollector:
    """This host's collector, on whichever backend the factory picks; ``nats_url`` (the
    server it is connected to) picks the address its heartbeat advertises."""
    name = node_id(node) if node else node_id_from_hostname()
    epoch = time.time() if epoch is None else epoch
    host = this_host(nats_url)
    selection = select_backend(name)
    backend: Backend = selection.backend
    if cpu_device:
        backend = WithCpuDevice(backend, HostCpuDevice(name))
    return NodeCollector(
        node=name,
        backend=backend,
        host=host,
        publisher=publisher,
        config=config,
        boot=boot_id(epoch),
        epoch=epoch,
        skipped=selection.skipped,
        threaded=selection.backend.name in ("nvml", "rocm"),
        default_link_gbps=fastest_gbps(host.interfaces),
    )


async def _serve_faults(nc: Client, sims: dict[str, SimNode]) -> Any:
    async def handle(msg: Msg) -> None:
        node = msg.subject.rsplit(".", 1)[-1]
        sim = sims.get(node)
        if sim is None:
            return  # another agent process simulates that node; let it answer
        encoding = sniff_encoding(msg.data)
        try:
            if encoding == "json":
                fault = msgspec.json.decode(msg.data, type=Fault)
            else:
                fault = msgspec.msgpack.decode(msg.data, type=Fault)
            sim.inject(fault)
            reply: dict[str, Any] = {"ok": True, "node": node, "fault": msgspec.to_builtins(fault)}
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            reply = {"ok": False, "node": node, "error": f"invalid fault: {exc}"}
        except RecursionError:
            reply = {"ok": False, "node": node, "error": "invalid fault: nested too deep"}
        if msg.reply:
            body = (
                msgspec.json.encode(reply) if encoding == "json" else msgspec.msgpack.encode(reply)
            )
            await msg.respond(body)

    return await nc.subscribe(subjects.SIM_FAULT_ANY, cb=handle)


async def _guard(name: str, body: Awaitable[None]) -> None:
    """A worker that fails is logged; it never takes the node's telemetry down with it."""
    try:
        await body
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s stopped with an error", name)


async def run_collection(
    nc: Client,
    collectors: Sequence[NodeCollector],
    publisher: Publisher,
    *,
    stop: asyncio.Event,
    interval_s: float,
    extra: Sequence[Awaitable[None]] = (),
) -> None:
    """Collect until ``stop``; then a final offline heartbeat per node, sent within a bound."""
    tasks = [
        asyncio.create_task(publisher.run(stop), name="publisher"),
        *(asyncio.create_task(_guard("worker", e)) for e in extra),
    ]
    try:
        await run_collectors(collectors, stop, interval_s)
    finally:
        final_heartbeats(collectors)
        with contextlib.suppress(Exception):
            await publisher.drain(timeout_s=min(10.0, 2.0 + len(collectors) / 1000))
        done, pending = await asyncio.wait(tasks, timeout=5.0)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("agent task %s failed: %s", task.get_name(), task.exception())


async def run_agents(
    nc: Client,
    *,
    stop: asyncio.Event,
    fleet: Path | None = None,
    node: str | None = None,
    interval_s: float | None = None,
    cpu_device: bool = False,
    temperature: bool = True,
    power: bool = True,
    workers: bool = True,
    worker_nc: Client | None = None,
    part: tuple[int, int] | None = None,
) -> None:
    """Run the agents until ``stop`` is set, then mark every node offline and return.

    ``worker_nc``: the workers' own connection (with auth, the ``worker`` role's: an agent may
    only publish telemetry); by default they share ``nc``. ``part=(i, k)`` runs the i-th of k
    equal shares of the fleet's nodes."""
    with contextlib.suppress(Exception):  # publishing retries until the streams exist
        await provision(nc.jetstream())
    publisher = Publisher(nc)
    epoch = time.time()
    sub: Any = None
    if fleet is not None:
        parsed = fleet_mod.load(fleet)
        interval = interval_s or parsed.interval_s
        config = CollectorConfig(interval_s=interval, temperature=temperature, power=power)
        collectors, sims = sim_collectors(
            parsed, publisher, config, only=node, cpu_device=cpu_device, epoch=epoch, part=part
        )
        sub = await _serve_faults(nc, sims)
        log.info(
            "simulating %d nodes, %d devices of %s every %.1fs",
            len(collectors),
            sum(c.backend.device_count() for c in collectors),
            fleet,
            interval,
        )
    else:
        interval = interval_s or DEFAULT_INTERVAL_S
        config = CollectorConfig(interval_s=interval, temperature=temperature, power=power)
        collectors = [
            host_collector(
                publisher,
                config,
                node=node,
                cpu_device=cpu_device,
                epoch=epoch,
                nats_url=nc.connected_url.geturl() if nc.connected_url else None,
            )
        ]

    extra: list[Awaitable[None]] = []
    run_worker = _worker_fn() if workers else None
    if run_worker is not None and collectors:
        # One assignment consumer for all of this process's workers, not one per node.
        feed = AssignmentFeed(worker_nc or nc, [c.node for c in collectors])
        extra.append(feed.run(stop))
        for c in collectors:
            hold: HoldMemory = c.backend.hold
            inbox = feed.inbox(c.node)
            extra.append(
                run_worker(
                    worker_nc or nc,
                    node=c.node,
                    stop=stop,
                    hold_memory=hold,
                    capacity=c.memory_total,
                    inbox=inbox,
                )
            )
    try:
        await run_collection(nc, collectors, publisher, stop=stop, interval_s=interval, extra=extra)
    finally:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for c in collectors:
            with contextlib.suppress(Exception):
                c.backend.close()
