"""`up --partitions 2` on a secured bus: admin provisions the partitions' stream, each projector
partition runs as the projector role, and both write their share of cluster_state without a
single permission violation (the server's log and every process's output say none)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from shardplane.bus import auth, keys
from shardplane.bus.connect import connect
from shardplane.bus.streams import CLUSTER_STATE, partition_stream
from shardplane.natsserver import free_port
from shardplane.projector.partition import partition_of
from tests.kit import eventually

DEMO_NODES = ("rig-a", "rig-b", "rig-c", "rig-d")


async def _keys_of_every_node(url: str, admin: Path, deadline_s: float) -> set[str]:
    """The nodes with device keys in cluster_state, once all four have one (or the deadline)."""
    nc = await connect(url, name="test-admin", creds=admin)
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + deadline_s

        async def bucket() -> KeyValue | None:
            try:  # the admin's creds are written before `up` has provisioned the buckets
                return await nc.jetstream().key_value(CLUSTER_STATE)
            except BucketNotFoundError:
                return None

        kv = await eventually(
            bucket, lambda b: b is not None, timeout=deadline_s, what=f"{CLUSTER_STATE} provisioned"
        )
        assert kv is not None

        async def nodes_seen() -> set[str]:
            for node in DEMO_NODES:
                with contextlib.suppress(Exception):  # not written yet
                    await kv.get(keys.device_key(node, 0))
                    seen.add(node)
            return seen

        # A miss is reported by the caller, with the processes' output.
        with contextlib.suppress(AssertionError):
            left = max(0.0, deadline - time.monotonic())
            await eventually(nodes_seen, lambda s: s == set(DEMO_NODES), timeout=left)
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
        await eventually(admin.exists, timeout=60, what="the admin's credentials written")
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
