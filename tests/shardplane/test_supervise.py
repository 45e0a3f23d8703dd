"""``shardplane up`` with a large fleet: services as separate processes, stopped within seconds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from shardplane import supervise
from shardplane.natsserver import NatsServer, free_port
from tests import kit
from tests.kit import api_devices

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN_S = 15.0  # GRACE_S for the children plus a loaded machine's scheduling


def test_a_large_fleet_gets_processes_and_the_agents_are_shared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(supervise.PROCESSES_ENV, raising=False)
    assert not supervise.wants_processes(16)
    assert supervise.wants_processes(8000)
    monkeypatch.setenv(supervise.PROCESSES_ENV, "0")
    assert not supervise.wants_processes(8000)
    monkeypatch.setenv(supervise.PROCESSES_ENV, "1")
    assert supervise.wants_processes(4)
    assert supervise.agent_shares(1000, cpus=2) == 2
    assert supervise.agent_shares(1000, cpus=16) == 4
    assert supervise.agent_shares(3, cpus=16) == 1
    kids = supervise.children(
        fleet=Path("f.toml"), node_count=1000, api_host="h", api_port=1, interval_s=1.0, cpus=2
    )
    names = [k.name for k in kids]
    assert names == ["projector", "planner", "controller", "api", "agents 1/2", "agents 2/2"]
    assert kids[5].argv == ("agent", "--fleet", "f.toml", "--part", "1/2", "--interval", "1")
    # With roles, each process connects as its own (the agents' workers as `worker`).
    creds = {r: Path(f"{r}.creds") for r in ("projector", "planner", "controller", "api")}
    creds |= {"agent": Path("agent.creds"), "worker": Path("worker.creds")}
    secured = supervise.children(
        fleet=Path("f.toml"),
        node_count=10,
        api_host="h",
        api_port=1,
        interval_s=None,
        cpus=1,
        creds=creds,
    )
    for kid in secured[:4]:
        assert kid.argv[-2:] == ("--creds", f"{kid.argv[0]}.creds"), kid
    assert secured[4].argv[-4:] == ("--creds", "agent.creds", "--worker-creds", "worker.creds")


def test_projector_partitions_by_rate_and_cores_or_as_asked() -> None:
    # 8,000 GPUs every 2 s is 4,000 samples/s: one partition keeps up
    assert supervise.partition_count(8000, 2.0, cpus=16) == 1
    # 80,000 GPUs every second wants 8; 16 cores allow 8, 2 cores one
    assert supervise.partition_count(80_000, 1.0, cpus=16) == 8
    assert supervise.partition_count(80_000, 1.0, cpus=2) == 1
    assert supervise.partition_count(16, 2.0, cpus=2, requested=3) == 3
    kids = supervise.children(
        fleet=None, node_count=0, api_host="h", api_port=1, interval_s=None, partitions=2
    )
    assert [k.name for k in kids] == [
        "projector 1/2",
        "projector 2/2",
        "planner",
        "controller",
        "api",
    ]
    assert kids[1].argv == ("projector", "--partition", "1/2")
    assert supervise.partitions_of(kids) == 2
    assert supervise.partitions_of(kids[2:]) == 1


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` (from /proc: the children run in their own
    sessions, so a process group does not name them)."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def devices_seen(port: int) -> int:
    return api_devices(port, timeout=5)


def run_up_and_stop(tmp_path: Path, nodes: int, gpus: int, expect_devices: int) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f'[[nodes]]\nname = "s"\ncount = {nodes}\ngpus = [{{ model = "A100", count = {gpus} }}]\n'
    )
    with NatsServer(store_dir=tmp_path / "nats") as server:
        api_port = free_port()
        env = {**os.environ, "NATS_URL": server.url, "PYTHONUNBUFFERED": "1"}
        env[supervise.PROCESSES_ENV] = "1"
        argv = ["up", "--fleet", str(fleet), "--api-port", str(api_port), "--interval", "2"]
        proc = kit.shardplane(*argv, env=env)
        try:
            kit.until_serving(
                proc,
                lambda: devices_seen(api_port) >= expect_devices,
                timeout=180,
                what=f"{expect_devices} devices seen",
            )
            kids = child_pids(proc.pid)
            assert len(kids) >= 5, kids  # projector, planner, api, >= 2 agent shares
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            took = time.monotonic() - t0
            out = proc.stdout.read() if proc.stdout else ""
            assert code == 0, out
            print(f"{expect_devices} devices: stopped {took:.1f} s after SIGTERM")
            assert took < STOP_WITHIN_S, f"stopped after {took:.1f} s\n{out}"
            assert [p for p in kids if alive(p)] == [], out
            assert "processes)" in out
        finally:
            if proc.poll() is None:
                proc.kill()


def test_up_runs_separate_processes_and_stops_within_seconds(tmp_path: Path) -> None:
    run_up_and_stop(tmp_path, nodes=300, gpus=2, expect_devices=600)


@pytest.mark.slow
def test_up_with_1000_nodes_by_8_gpus_stops_within_seconds(tmp_path: Path) -> None:
    run_up_and_stop(tmp_path, nodes=1000, gpus=8, expect_devices=8000)
