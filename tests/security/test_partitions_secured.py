"""`up --partitions 2` on a secured bus: admin provisions the partitions' stream, each projector
partition runs as the projector role, and both write their share of cluster_state without a
single permission violation (the server's log and every process's output say none)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from nats.js.errors import BucketNotFoundError

from shardplane.bus import auth, subjects
from shardplane.bus.connect import connect
from shardplane.bus.streams import CLUSTER_STATE, partition_stream
from shardplane.natsserver import free_port
from shardplane.projector.partition import partition_of

DEMO_NODES = ("rig-a", "rig-b", "rig-c", "rig-d")


async def _keys_of_every_node(url: str, admin: Path, deadline_s: float) -> set[str]:
    """The nodes with device keys in cluster_state, once all four have one (or the deadline)."""
    nc = await connect(url, name="test-admin", creds=admin)
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + deadline_s
        kv = None
        while kv is None and time.monotonic() < deadline:
            try:  # the admin's creds are written before `up` has provisioned the buckets
                kv = await nc.jetstream().key_value(CLUSTER_STATE)
            except BucketNotFoundError:
                await asyncio.sleep(0.25)
        assert kv is not None, f"{CLUSTER_STATE} was never provisioned"
        while time.monotonic() < deadline and seen != set(DEMO_NODES):
            for node in DEMO_NODES:
                try:
                    await kv.get(subjects.device_key(node, 0))
                    seen.add(node)
                except Exception:  # not written yet
                    pass
            await asyncio.sleep(0.5)
        info = await nc.jetstream().stream_info(partition_stream(2))
        assert info.state.messages > 0  # the projectors consumed the sourced copies
        return seen
    finally:
        await nc.close()


async def test_two_partitions_run_secured_without_violations(tmp_path: Path) -> None:
    assert {partition_of(n, 2) for n in DEMO_NODES} == {0, 1}  # both partitions have work
    env = {**os.environ, "NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    for name in ("NATS_CREDS", "NATS_USER", "NATS_TOKEN", "SHARDPLANE_API_TOKEN"):
        env.pop(name, None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shardplane.cli",
        "up",
        "--partitions",
        "2",
        "--api-port",
        str(free_port()),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        admin = auth.creds_path(tmp_path / "data" / "auth", "admin")
        for _ in range(240):
            if admin.exists():
                break
            await asyncio.sleep(0.25)
        seen = await _keys_of_every_node(env["NATS_URL"], admin, deadline_s=120.0)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    assert seen == set(DEMO_NODES), text[-3000:]
    assert "Violation" not in text, text[-3000:]
    (log_file,) = (tmp_path / "data").glob("nats*/nats-server.log")
    log = log_file.read_text()
    assert "data/auth/server.conf" in log
    assert "Violation" not in log, [line for line in log.splitlines() if "Violation" in line][:5]
    assert proc.returncode == 0, text[-3000:]
