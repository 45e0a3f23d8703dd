"""``shardplane up`` for a large fleet: each service in its own process, under a supervisor.

Why: in one process every service shares one event loop and one core. With 1,000 simulated
nodes x 8 GPUs that loop ran at 99 % of a core, the KV fell further behind every second, and
SIGTERM did not stop it within 25 s because the loop was too busy to get to the stop. As
separate processes the projector, planner, API and the agents (split into shares of the fleet,
``agent --part I/K``) use every core, and each stops on its own loop.

The supervisor (the ``up`` process) keeps the embedded nats-server, starts the children in
their own sessions (a terminal's Ctrl-C reaches only ``up``, which then stops them in order),
forwards the stop as SIGTERM, and kills whatever has not exited ``GRACE_S`` later, so ``up``
ends within seconds whatever a child is doing. A child that exits by itself ends ``up`` with
status 1, as a failing component does in the single-process ``up``: a half-running control
plane that looks up is worse than one that says it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shardplane.bus.streams import MAX_PARTITIONS

log = logging.getLogger(__name__)

PROCESSES_ENV = "SHARDPLANE_UP_PROCESSES"  # "1": always separate processes, "0": never
MIN_DEVICES = 512  # below this one process keeps up easily and starts faster
NODES_PER_AGENT = 250
GRACE_S = 8.0
# Half of what one projector drained from a backlog here (19.4k samples/s): headroom for the
# live load's bursts and for the rest of its work (sweeps, statuses).
SAMPLES_PER_PARTITION = 10_000


@dataclass(frozen=True)
class Child:
    """One service process: a name for messages and its ``shardplane`` arguments."""

    name: str
    argv: tuple[str, ...]


def wants_processes(device_count: int) -> bool:
    """Whether ``up`` runs its services as separate processes for a fleet of this size."""
    forced = os.environ.get(PROCESSES_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return device_count >= MIN_DEVICES


def partition_count(
    device_count: int, interval_s: float, cpus: int | None = None, requested: int | None = None
) -> int:
    """Projector partitions for ``up``: ``requested`` (``--partitions``), else one per
    ``SAMPLES_PER_PARTITION`` samples a second, at most one per two cores (a partition and its
    share of nats-server's work each want most of a core; on 2 cores that is always 1)."""
    if requested is not None:
        return requested
    cores = cpus if cpus is not None else (os.cpu_count() or 2)
    wanted = math.ceil(device_count / max(interval_s, 1e-3) / SAMPLES_PER_PARTITION)
    return max(1, min(wanted, cores // 2, MAX_PARTITIONS))


def agent_shares(node_count: int, cpus: int | None = None) -> int:
    """How many agent processes share the fleet: one per ``NODES_PER_AGENT`` nodes, at most one
    per core (at least 2 cores' worth: the services need the rest)."""
    cores = max(2, cpus if cpus is not None else (os.cpu_count() or 2))
    return max(1, min(cores, math.ceil(node_count / NODES_PER_AGENT)))


def children(
    *,
    fleet: Path | None,
    node_count: int,
    api_host: str,
    api_port: int,
    interval_s: float | None,
    verbose: bool = False,
    cpus: int | None = None,
    shares: int | None = None,
    creds: Mapping[str, Path] | None = None,
    partitions: int = 1,
) -> list[Child]:
    """The processes of a full ``up``: projector (one per partition), planner, controller, API,
    and the agents' shares (``shares`` of them, or as many as ``agent_shares`` finds right).
    With ``creds`` (role -> credentials file) each connects as its role."""
    common = ("-v",) if verbose else ()

    def role(name: str, flag: str = "--creds") -> tuple[str, ...]:
        path = (creds or {}).get(name)
        return (flag, str(path)) if path is not None else ()

    out = [
        Child("projector", ("projector", *role("projector"), *common))
        if partitions == 1
        else Child(
            f"projector {i + 1}/{partitions}",
            ("projector", "--partition", f"{i}/{partitions}", *role("projector"), *common),
        )
        for i in range(partitions)
    ]
    out += [
        Child("planner", ("planner", *role("planner"), *common)),
        Child("controller", ("controller", *role("controller"), *common)),
        Child(
            "api",
            ("api", "--host", api_host, "--port", str(api_port), *role("api"), *common),
        ),
    ]
    if fleet is not None:
        shares = shares or agent_shares(node_count, cpus)
        interval = ("--interval", f"{interval_s:g}") if interval_s else ()
        for i in range(shares):
            argv = (
                "agent",
                "--fleet",
                str(fleet),
                "--part",
                f"{i}/{shares}",
                *interval,
                *role("agent"),
                *role("worker", "--worker-creds"),
                *common,
            )
            out.append(Child(f"agents {i + 1}/{shares}", argv))
    return out


def for_fleet(
    fleet: Path | None, args: argparse.Namespace, creds: Mapping[str, Path] | None = None
) -> list[Child]:
    """The children of ``up`` (its parsed options), or none when one process will do: a small
    fleet with one projector partition."""
    from shardplane.agents.fleet import load

    parsed = load(fleet) if fleet is not None else None
    devices = parsed.device_count() if parsed is not None else 0
    interval = args.interval or (parsed.interval_s if parsed is not None else 2.0)
    parts = partition_count(devices, interval, requested=getattr(args, "partitions", None))
    if parts == 1 and not wants_processes(devices):
        return []
    return children(
        fleet=fleet,
        node_count=len(parsed.nodes) if parsed is not None else 0,
        api_host=args.api_host,
        api_port=args.api_port,
        interval_s=args.interval,
        verbose=bool(getattr(args, "verbose", False)),
        creds=creds,
        partitions=parts,
    )


def partitions_of(kids: list[Child]) -> int:
    """How many projector partitions ``kids`` run (the stream to provision before they start)."""
    return sum(1 for k in kids if "--partition" in k.argv) or 1


async def spawn(child: Child, url: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "NATS_URL": url, PROCESSES_ENV: "0"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shardplane.cli",
        *child.argv,
        env=env,
        start_new_session=True,  # the supervisor alone decides when a child stops
    )


async def stop_all(procs: dict[str, asyncio.subprocess.Process], grace_s: float = GRACE_S) -> None:
    """SIGTERM to every child still running; SIGKILL to those still there after ``grace_s``."""
    for proc in procs.values():
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    waits = [asyncio.ensure_future(p.wait()) for p in procs.values()]
    _, pending = await asyncio.wait(waits, timeout=grace_s)
    if pending:
        late = [n for n, p in procs.items() if p.returncode is None]
        log.warning("killing %s: still running %.0f s after SIGTERM", ", ".join(late), grace_s)
        for proc in procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await asyncio.wait(pending, timeout=5.0)


async def supervise(url: str, stop: asyncio.Event, kids: list[Child]) -> int:
    """Run ``kids`` against the NATS at ``url`` until ``stop`` is set or one of them exits;
    0 when stopped, 1 when a child ended by itself. The caller provisions the bus first (once,
    before a dozen processes race to do it; as admin where the bus has roles)."""
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        for kid in kids:
            procs[kid.name] = await spawn(kid, url)
        exits = {asyncio.ensure_future(p.wait()): n for n, p in procs.items()}
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({stopped, *exits}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        ended = [(exits[f], f.result()) for f in done if f in exits]
        for name, code in ended:
            log.error("%s exited with status %s; stopping the others", name, code)
        return 1 if ended and not stop.is_set() else 0
    finally:
        await stop_all(procs)
