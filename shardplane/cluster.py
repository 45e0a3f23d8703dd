"""A local NATS cluster in one command: N wheel nats-servers on loopback, clustered.

High availability needs at least three JetStream servers (a replicated stream needs a
majority of its replicas to elect a leader), and starting them by hand means a route list, a
unique server name, a cluster name and a store folder per server, and waiting until the
JetStream meta layer has elected a leader before anything can be provisioned.
:class:`NatsCluster` does all that for ``shardplane nats --cluster 3``, ``shardplane up
--cluster 3``, the failover tests and ``bench failover`` (which kill servers with SIGKILL and
start them again on the same ports and store, as a crashed machine would come back).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client

from shardplane.natsserver import NatsServer, NatsServerError, Scratch, free_port

CLUSTER_NAME = "shardplane"


# Below Linux's ephemeral range (32768-60999 by default): a member killed and started again
# must bind the same ports, and a port the kernel hands out for outgoing connections can be
# taken by one of them while the member is down (seen once: "bind: address already in use").
STABLE_PORTS = range(20_000, 32_000)
START_ATTEMPTS = 3  # a cluster on ports it picked itself: starts tried before giving up


def restartable_port() -> int:
    """A free loopback port outside the ephemeral range, else any free one."""
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(STABLE_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def restartable_ports(count: int) -> list[int]:
    """``count`` distinct ports as :func:`restartable_port` picks them (each probe releases its
    port at once, so without this two members could be handed the same one)."""
    chosen: list[int] = []
    while len(chosen) < count:
        if (port := restartable_port()) not in chosen:
            chosen.append(port)
    return chosen


class ClusterMember(NatsServer):
    """One server of a cluster: a NatsServer with a name, a route port and routes to the rest."""

    def __init__(
        self,
        name: str,
        port: int,
        cluster_port: int,
        routes: list[int],
        store_dir: Path,
        config: Path | None = None,
        monitor_port: int | None = None,
    ) -> None:
        super().__init__(port=port, store_dir=store_dir, config=config, monitor_port=monitor_port)
        self.name = name
        self.cluster_port = cluster_port
        self.routes = routes

    def command(self) -> list[str]:
        routes = ",".join(f"nats://{self.host}:{p}" for p in self.routes)
        return [
            *super().command(),
            *("--name", self.name, "--cluster_name", CLUSTER_NAME),
            *("--cluster", f"nats://{self.host}:{self.cluster_port}", "--routes", routes),
        ]


class NatsCluster(Scratch):
    """``size`` clustered servers with JetStream; a (sync or async) context manager.

    ``base_port``: client ports base_port, base_port+1...; route ports base_port+100+i; without
    it every port is a free one. ``store_root``: one folder per server under it (a temporary
    folder by default)."""

    def __init__(
        self,
        size: int = 3,
        *,
        base_port: int | None = None,
        store_root: str | Path | None = None,
        config: Path | None = None,
        monitor_base_port: int | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least 1 server, not {size}")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="shardplane-cluster-")
            store_root = self._tmp.name
        self.store_root = Path(store_root)
        self.size, self.base_port, self.config = size, base_port, config
        self.monitor_base_port = monitor_base_port
        self.members = self._members()

    def _members(self) -> list[ClusterMember]:
        size, base = self.size, self.base_port
        if base:
            ports, route_ports = (
                [base + i for i in range(size)],
                [base + 100 + i for i in range(size)],
            )
        else:
            picked = restartable_ports(2 * size)
            ports, route_ports = picked[:size], picked[size:]
        return [
            ClusterMember(
                name=f"nats-{i + 1}",
                port=ports[i],
                cluster_port=route_ports[i],
                routes=[p for j, p in enumerate(route_ports) if j != i],
                store_dir=self.store_root / f"nats-{i + 1}",
                config=self.config,
                # -1: a random port (a config file may name a fixed one, taken by the first)
                monitor_port=self.monitor_base_port + i if self.monitor_base_port else -1,
            )
            for i in range(size)
        ]

    def _pick_again(self, exc: BaseException, attempt: int) -> bool:
        """After a failed start (every member stopped): whether to try again on new ports. A
        probed port is free when picked and may be taken before its server binds it (another
        process, a test beside it); only ports and a store this cluster chose itself are
        changed, the store wiped (it holds the failed start's peers)."""
        if not isinstance(exc, NatsServerError) or "address already in use" not in str(exc):
            return False
        if self.base_port or self._tmp is None or attempt >= START_ATTEMPTS:
            return False
        for m in self.members:
            shutil.rmtree(m.store_dir, ignore_errors=True)
        self.members = self._members()
        return True

    @property
    def url(self) -> str:
        """Every server, comma-separated: what NATS_URL should say so clients can fail over."""
        return ",".join(m.url for m in self.members)

    def member(self, name: str) -> ClusterMember:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(f"no server {name!r} in this cluster ({[m.name for m in self.members]})")

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for attempt in itertools.count(1):
            try:
                for m in self.members:
                    m.start(timeout)
                asyncio.run(wait_for_jetstream(self.url, timeout, len(self.members)))
                return self
            except BaseException as exc:
                self.stop()
                if not self._pick_again(exc, attempt):
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    async def __aenter__(self) -> NatsCluster:
        for attempt in itertools.count(1):
            try:
                for m in self.members:
                    await asyncio.to_thread(m.start)
                await wait_for_jetstream(self.url, 30.0, len(self.members))
                return self
            except BaseException as exc:
                await asyncio.to_thread(self.stop)
                if not self._pick_again(exc, attempt):
                    raise
        raise AssertionError("unreachable")


PROBE_STREAM = "shardplane_cluster_probe"


async def wait_for_jetstream(url: str, timeout: float, size: int = 1) -> None:
    """Until the cluster's JetStream can place a stream on all ``size`` servers: before its
    meta layer has a leader provisioning fails with 'JetStream system temporarily unavailable',
    and before every server has joined it an R3 stream finds 'no suitable peers'. A throwaway
    in-memory stream with ``size`` replicas is created (and deleted) to prove it."""
    deadline = time.monotonic() + timeout
    nc = await nats.connect(servers=url.split(","), connect_timeout=2, max_reconnect_attempts=-1)
    config = json.dumps(
        {"name": PROBE_STREAM, "subjects": [], "storage": "memory", "num_replicas": size}
    ).encode()
    try:
        last = ""
        while time.monotonic() < deadline:
            try:
                reply = await nc.request(
                    f"$JS.API.STREAM.CREATE.{PROBE_STREAM}", config, timeout=2.0
                )
                answer = json.loads(reply.data)
                if "error" not in answer:
                    await nc.request(f"$JS.API.STREAM.DELETE.{PROBE_STREAM}", b"", timeout=2.0)
                    return
                last = str(answer["error"])
            except Exception as exc:  # no responders until JetStream is up
                last = repr(exc)
            await asyncio.sleep(0.1)
        raise NatsServerError(f"the cluster's JetStream did not come up in {timeout}s: {last}")
    finally:
        await nc.close()


class Peer(msgspec.Struct, frozen=True):
    name: str = ""
    current: bool = False
    offline: bool = False


class StreamCluster(msgspec.Struct, frozen=True):
    """The ``cluster`` part of a stream's info: who leads, how current the others are."""

    leader: str | None = None
    replicas: tuple[Peer, ...] = ()


class _StreamInfo(msgspec.Struct, frozen=True):
    cluster: StreamCluster | None = None


_STREAM_INFO = msgspec.json.Decoder(_StreamInfo)


async def stream_cluster(nc: Client, stream: str) -> StreamCluster | None:
    """``stream``'s leader and replicas (None: no answer, as while it elects a leader)."""
    try:
        reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2.0)
        return _STREAM_INFO.decode(reply.data).cluster
    except Exception:
        return None


async def stream_leader(nc: Client, stream: str) -> str | None:
    """The name of the server leading ``stream`` (None while it has no leader)."""
    cluster = await stream_cluster(nc, stream)
    return cluster.leader if cluster is not None and cluster.leader else None


def serve_cluster(cluster: NatsCluster, replicas: int | None = None) -> int:
    """``shardplane nats --cluster N``: run the cluster in the foreground until Ctrl-C or until
    a server exits by itself (then the rest are stopped too, and the exit status says so)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM (docker stop, systemd) ends it like Ctrl-C

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        cluster.start()
        if replicas is not None:
            from shardplane.wiring import provision_replicas

            provision_replicas(cluster.url, replicas)
        print(f"NATS cluster of {len(cluster.members)} (JetStream) on {cluster.url}", flush=True)
        for m in cluster.members:
            monitor = (
                f", monitoring http://127.0.0.1:{m.monitor_port}/"
                if (m.monitor_port or 0) > 0
                else ""
            )
            print(f"  {m.name}: {m.url}, routes :{m.cluster_port}{monitor}, store {m.store_dir}")
        print(f"clients: NATS_URL={cluster.url}", flush=True)
        while all(m.proc is not None and m.proc.poll() is None for m in cluster.members):
            time.sleep(0.2)
        gone = [m.name for m in cluster.members if m.proc is None or m.proc.poll() is not None]
        print(f"nats-server {', '.join(gone)} exited; stopping the cluster", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
