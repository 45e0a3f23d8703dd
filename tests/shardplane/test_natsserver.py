from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import nats
import pytest

from shardplane.cluster import NatsCluster
from shardplane.natsserver import NatsServer, embedded_for, free_port, reachable, server_binary
from tests import kit

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_binary_is_new_enough() -> None:
    out = subprocess.run(
        [str(server_binary()), "--version"], capture_output=True, text=True, check=True
    )
    major, minor = (int(x) for x in out.stdout.strip().split("v")[-1].split(".")[:2])
    assert (major, minor) >= (2, 11), out.stdout


async def test_embedded_server_starts_with_jetstream_and_stops_cleanly(tmp_path: Path) -> None:
    server = NatsServer(
        store_dir=tmp_path / "store", config=ROOT / "nats.conf", monitor_port=free_port()
    )
    async with server:
        assert reachable(server.url)
        nc = await nats.connect(server.url)
        info = await nc.jetstream().account_info()
        assert info.limits is not None
        await nc.close()
        # A URL that answers is used as is: nothing new gets started.
        assert embedded_for(server.url) is None
        proc = server.proc
        assert proc is not None
    assert proc.poll() == 0, "SIGTERM must end the server cleanly"
    assert not reachable(server.url)
    assert (tmp_path / "store" / "jetstream").is_dir()


def test_unreachable_url_gets_an_embedded_server_on_its_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.delenv("NATS_URL", raising=False)
    server = embedded_for(f"nats://127.0.0.1:{port}")
    assert server is not None and server.port == port


def test_shardplane_nats_runs_in_the_foreground_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port, monitor = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ("nats", "--port", str(port), "--store", str(tmp_path / "s"))
    proc = kit.shardplane(*args, "--monitor-port", str(monitor), env=env)
    try:
        kit.until_serving(
            proc,
            lambda: reachable(f"nats://127.0.0.1:{port}"),
            timeout=20,
            what="shardplane nats accepting connections",
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not reachable(f"nats://127.0.0.1:{port}")


async def test_a_cluster_whose_picked_port_is_taken_before_it_binds_starts_on_new_ones() -> None:
    """Ports are probed free, then bound by the servers a moment later; something else can
    take one in between (CI saw "bind: address already in use" on a route port)."""
    cluster = NatsCluster(3)
    picked = [p for m in cluster.members for p in (m.port, m.cluster_port)]
    assert len(set(picked)) == 6, picked
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", cluster.members[2].cluster_port))
        other.listen()
        async with cluster:  # (its start proves an R3 stream can be placed)
            taken = other.getsockname()[1]
            assert taken not in {p for m in cluster.members for p in (m.port, m.cluster_port)}
            assert all(m.proc is not None and m.proc.poll() is None for m in cluster.members)
