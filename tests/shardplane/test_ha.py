"""High availability on real servers: a 3-server cluster, replicas, leases, failover.

The failover test kills -9 the leader of TELEMETRY under load (agents publishing, placements
requested) in the default run; the slow one kills the leaders of TELEMETRY, of the KV and of
the ledger in turn. Both run ``bench failover``'s harness and assert its figures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shardplane.bench import failover
from shardplane.bus import codec, keys, subjects
from shardplane.bus.messages import DeviceState
from shardplane.bus.streams import (
    CLUSTER_STATE,
    LEDGER,
    TELEMETRY,
    bucket_configs,
    provision,
    stream_configs,
)
from shardplane.cluster import NatsCluster
from shardplane.natsserver import reachable
from shardplane.planner.synthetic import device_state
from shardplane.projector import partition
from shardplane.projector.lease import LEASE_KEY, Lease
from shardplane.projector.service import ProjectorConfig
from shardplane.status import read_state
from tests.kit import eventually
from tests.projector.helpers import running

EVERY = [c.name for c in stream_configs()] + [f"KV_{b.bucket}" for b in bucket_configs()]


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    with NatsCluster(3) as nodes:
        yield nodes


async def _wipe(nc: Client) -> None:
    js = nc.jetstream()
    for info in await js.streams_info():
        await js.delete_stream(info.config.name or "")


@pytest.fixture
async def cnc(cluster: NatsCluster) -> AsyncIterator[Client]:
    client = await nats.connect(servers=cluster.url.split(","))
    await _wipe(client)
    yield client
    await client.close()


async def _replicas(nc: Client) -> dict[str, int]:
    js = nc.jetstream()
    return {name: (await js.stream_info(name)).config.num_replicas or 1 for name in EVERY if name}


async def test_a_cluster_gets_three_replicas_and_provisioning_never_lowers_them(
    cnc: Client, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = cnc.jetstream()
    monkeypatch.delenv("SHARDPLANE_REPLICAS", raising=False)
    await provision(js)
    assert set((await _replicas(cnc)).values()) == {3}
    # A service restarting with a lower setting (on main: every start reset streams to 1).
    with caplog.at_level(logging.WARNING, logger="shardplane.bus.streams"):
        await provision(js, replicas=1)
    assert set((await _replicas(cnc)).values()) == {3}
    assert "TELEMETRY has 3 replicas where 1 are configured; keeping 3" in caplog.text


async def test_replicas_an_operator_set_survive_and_only_an_explicit_setting_raises_them(
    cnc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = cnc.jetstream()
    monkeypatch.delenv("SHARDPLANE_REPLICAS", raising=False)
    await provision(js, replicas=1)  # as an operator who wants R1 on a cluster
    assert set((await _replicas(cnc)).values()) == {1}
    await provision(js)  # a service starting with the default (3 on a cluster)
    assert set((await _replicas(cnc)).values()) == {1}
    monkeypatch.setenv("SHARDPLANE_REPLICAS", "3")
    await provision(js)
    assert set((await _replicas(cnc)).values()) == {3}


async def test_the_partitions_mirrors_get_telemetrys_replicas_and_keep_an_operators(
    cnc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One copy of a partition's stream would stall that partition when its server is lost,
    while TELEMETRY (R3) lives on."""
    js = cnc.jetstream()
    monkeypatch.delenv("SHARDPLANE_REPLICAS", raising=False)
    await provision(js)
    names = partition.stream_names(2)
    await partition.provision(cnc, 2)
    held = {n: (await js.stream_info(n)).config.num_replicas for n in names}
    assert held == dict.fromkeys(names, 3)
    config = (await js.stream_info(names[0])).config
    config.num_replicas = 1  # an operator's choice
    await js.update_stream(config)
    await partition.provision(cnc, 2)  # a projector starting again
    held = {n: (await js.stream_info(n)).config.num_replicas for n in names}
    assert held == {names[0]: 1, names[1]: 3}


async def _until_led(cnc: Client, stream: str, timeout: float = 20.0) -> None:
    """A freshly created R3 stream answers no write until its replicas elected a leader
    (seconds on a loaded machine); the lease's own code is not under test for that here."""
    js = cnc.jetstream()

    async def leader() -> str | None:
        with contextlib.suppress(Exception):
            info = await js.stream_info(stream)
            return info.cluster.leader if info.cluster is not None else None
        return None

    await eventually(leader, bool, timeout=timeout, what=f"{stream} electing a leader")


async def test_the_lease_survives_a_renewal_whose_answer_was_lost(cnc: Client) -> None:
    js = cnc.jetstream()
    await provision(js)
    holder, other = Lease(js, holder="a", ttl_s=30.0), Lease(js, holder="b", ttl_s=30.0)
    await holder.bucket()  # created on first use
    await _until_led(cnc, "KV_projector_lease")
    assert await holder.try_acquire()
    kv = await holder.bucket()
    assert (await kv.status()).bucket == "projector_lease"
    # The renewal reached the server, its answer did not (a reconnect): the key moved on.
    first = (await kv.get(LEASE_KEY)).revision
    await kv.update(LEASE_KEY, b"a", last=first)
    assert await holder.renew()  # reclaimed, not lost
    assert holder.valid()
    assert not await other.try_acquire()  # and nobody else can take it
    # An outage of the bucket outlasted the TTL: the key aged out, nobody took it.
    await kv.purge(LEASE_KEY)
    assert await holder.renew()  # taken again, still leading
    assert not await other.try_acquire()
    # It aged out again and this time another replica took it: lost, not taken back.
    await kv.purge(LEASE_KEY)
    assert await other.try_acquire()
    assert not await holder.renew()
    assert not holder.valid()
    assert (await kv.get(LEASE_KEY)).value == b"b"


async def test_status_skips_an_undecodable_value_and_shows_silent_devices_stale(
    cnc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    js = cnc.jetstream()
    await provision(js)
    kv = await js.key_value(CLUSTER_STATE)
    now = time.time()
    await kv.put("devices.rig.0", codec.encode(device_state("rig", 0, "A100-80GB", ts=now)))
    await kv.put("devices.rig.1", codec.encode(device_state("rig", 1, "A100-80GB", ts=now - 60)))
    await kv.put("devices.rig.2", b"\x93not a device")
    with caplog.at_level(logging.WARNING):
        devices, _, _ = await read_state(cnc)
    assert [(d.sample.index, d.online) for d in devices] == [(0, True), (1, False)]
    assert (devices[1].offline_reason or "").startswith("stale: no update for 60s")
    assert "skipping devices.rig.2: undecodable value" in caplog.text


async def test_a_new_leader_applies_the_backlog_before_it_sweeps(cnc: Client) -> None:
    """The projector was away for a while; the device's agent kept publishing. Taking over,
    the projector must apply the backlog (whose oldest samples are older than the TTL) before
    judging liveness: the device is never written offline."""
    js = cnc.jetstream()
    await provision(js)
    kv = await js.key_value(CLUSTER_STATE)
    key = keys.device_key("back", 0)
    template = device_state("back", 0, "A100-80GB").sample
    await kv.put(key, codec.encode(device_state("back", 0, "A100-80GB", ts=time.time())))
    seq = 1

    async def publish_one() -> None:
        nonlocal seq
        seq += 1
        sample = msgspec.structs.replace(template, seq=seq, ts=time.time())
        await js.publish(subjects.gpu_sample("back", 0), codec.encode(sample))
        await asyncio.sleep(0.1)

    for _ in range(40):  # 4 s of samples while no projector runs: the backlog
        await publish_one()
    written: list[DeviceState] = []
    caught_up = asyncio.Event()

    async def on_write(msg: Msg) -> None:
        written.append(codec.decode(DeviceState, msg.data))
        if written[-1].sample.seq >= 45:
            caught_up.set()

    sub = await cnc.subscribe(f"$KV.{CLUSTER_STATE}.{key}", cb=on_write)
    # Rounds of 5 messages, a 1.5 s TTL: the first rounds hold samples 4 s old.
    config = ProjectorConfig(max_round=5, fetch_batch=5, lease_ttl_s=1.0, ttl_s=1.5)
    async with running(cnc.connected_url.geturl() if cnc.connected_url else "", config):
        while not caught_up.is_set() and seq < 400:  # the agent keeps publishing
            await publish_one()
    await sub.unsubscribe()
    assert caught_up.is_set(), [(w.sample.seq, w.online) for w in written]
    assert all(w.online for w in written), [
        (w.sample.seq, w.offline_reason) for w in written if not w.online
    ]


def _assert_failover(report: failover.Report) -> None:
    figures = report.figures()
    detail = failover.table(report)
    assert figures["lost"] == 0, detail + f"\n{report.kv_wrong}"
    assert figures["false_offline"] == 0, detail + f"\n{report.false_offline[:5]}"
    assert all(k.unavailable_s is not None for k in report.kills), detail
    assert figures["unavailable_s_max"] <= failover.TARGET_UNAVAILABLE_S, detail
    assert report.placements_ok > 0 and report.samples_acked > 0, detail


async def test_killing_the_telemetry_leader_under_load_loses_nothing() -> None:
    report = await failover.run(1, targets=(TELEMETRY,))
    _assert_failover(report)
    assert [k.target for k in report.kills] == [TELEMETRY]


@pytest.mark.slow
async def test_killing_the_leaders_of_telemetry_the_kv_and_the_ledger_loses_nothing() -> None:
    report = await failover.run(3, targets=(TELEMETRY, f"KV_{CLUSTER_STATE}", f"KV_{LEDGER}"))
    _assert_failover(report)
    with contextlib.suppress(Exception):
        print(failover.table(report))


def _free_block() -> int:
    """A base port with base..base+2 and base+100..base+102 free (a cluster's layout)."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(20_000, 40_000)
        try:
            for port in [base + i for i in range(3)] + [base + 100 + i for i in range(3)]:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports")


def test_nats_cluster_command_runs_three_clustered_servers_and_stops_them(
    tmp_path: Path,
) -> None:
    base = _free_block()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "shardplane.cli", "nats", "--cluster", "3"),
            *("--port", str(base), "--monitor-port", "0", "--store", str(tmp_path / "cluster")),
            *("--replicas", "3"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(5)]
        urls = ",".join(f"nats://127.0.0.1:{base + i}" for i in range(3))
        assert lines[-1].strip() == f"clients: NATS_URL={urls}", lines
        assert all(reachable(f"nats://127.0.0.1:{base + i}") for i in range(3))
        assert sorted(p.name for p in (tmp_path / "cluster").iterdir()) == [
            "nats-1",
            "nats-2",
            "nats-3",
        ]

        async def provisioned() -> set[int]:
            nc = await nats.connect(servers=urls.split(","))
            try:  # --replicas 3 provisioned everything before the URL was printed
                return set((await _replicas(nc)).values())
            finally:
                await nc.close()

        assert asyncio.run(provisioned()) == {3}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not any(reachable(f"nats://127.0.0.1:{base + i}") for i in range(3))
    finally:
        if proc.poll() is None:
            proc.kill()
