"""`demo` runs secured by default and `status` finds the role credentials in the data dir."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

from shardplane.bench._probes import secure_bus
from shardplane.bus import auth
from shardplane.natsserver import free_port


async def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shardplane.cli",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(errors="replace")


async def test_status_uses_the_api_credentials_of_the_data_dir(tmp_path: Path) -> None:
    async with secure_bus() as bus:
        env = {**os.environ, "NATS_URL": bus.url}
        for name in ("NATS_CREDS", "NATS_USER", "NATS_TOKEN"):
            env.pop(name, None)
        # Without credentials the secured server refuses the one-shot command...
        code, out = await _run(["status", "--connect-timeout", "3"], tmp_path, env, 60)
        assert code == 1 and "Authorization Violation" in out
        # ...and finds them in ./data/auth, as `up` and `demo` leave them.
        shutil.copytree(bus.folder, tmp_path / "data" / "auth")
        code, out = await _run(["status", "--json"], tmp_path, env, 60)
        assert code == 0, out
        assert set(json.loads(out)) == {"devices", "nodes", "instances"}


async def test_demo_is_secured_by_default(tmp_path: Path) -> None:
    env = {**os.environ, "NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    env.pop("SHARDPLANE_API_TOKEN", None)
    code, out = await _run(["demo", "--once", "--api-port", str(free_port())], tmp_path, env, 240)
    assert code == 0, out[-3000:]
    folder = tmp_path / "data" / "auth"
    users = auth.load_dir(folder)
    assert {"admin", "agent", "worker", "projector", "planner", "api"} <= set(users)
    assert users["agent"].nodes == ("rig-a", "rig-b", "rig-c", "rig-d")
    token = (folder / "api-token").read_text().strip()
    assert f"API token for changes (Authorization: Bearer): {token}" in out
    assert "instance demo-llama-3-1-70b: reserved" in out
    # The embedded server's store is data/nats-<port> (one per port, so two `up`s can coexist).
    (log_file,) = (tmp_path / "data").glob("nats*/nats-server.log")
    log = log_file.read_text()
    assert "data/auth/server.conf" in log and "Violation" not in log
