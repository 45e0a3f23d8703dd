"""The commands people type, run as processes against a real NATS server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

from shardplane.natsserver import NatsServer, free_port
from tests import kit
from tests.kit import api_devices


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "NATS_URL": url, "PYTHONUNBUFFERED": "1"}


def _ran(url: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``shardplane ARGS`` against the server at ``url``, run to its end."""
    return kit.shardplane_ran(*args, env=_env(url), timeout=timeout)


def test_demo_once_prints_the_placement_table_and_exits(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "nats") as server:
        api_port = free_port()
        out = _ran(server.url, "demo", "--once", "--api-port", str(api_port), timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        text = out.stdout
        assert "llama-3.1-70b" in text
        for column in ("stage", "node", "device", "GPU", "layers", "GiB", "est. ms"):
            assert column in text, f"column {column!r} missing from:\n{text}"
        assert "reserved" in text, text
        # What the plan delivers, not the slowest stage as a rate.
        assert "ms per token per sequence" in text and "micro-batch" in text, text
        assert "bottleneck" not in text, text
        assert f"http://127.0.0.1:{api_port}/" in text
        # SmolLM2 really ran across several simulated devices, measured beside the plan.
        assert "generating with smollm2-135m" in text, text
        assert " Paris" in text, text
        ran = re.search(r"(\d+) tokens on (\d+) stage\(s\), measured [0-9.]+ ms/token", text)
        assert ran is not None and int(ran.group(2)) >= 2, text
        assert "plan predicted" in text, text

        # The state outlives the demo in NATS: `shardplane status` reads it back.
        status = _ran(server.url, "status", "--json", timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        state = json.loads(status.stdout)
        assert len(state["devices"]) >= 6
        assert state["instances"], "the demo's instance is in the KV"


def test_up_serves_the_api_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "nats") as server:
        api_port = free_port()
        args = ("up", "--api-port", str(api_port), "--interval", "0.5")
        proc = kit.shardplane(*args, env=_env(server.url))
        try:
            kit.until_serving(
                proc, lambda: api_devices(api_port) >= 6, timeout=60, what="6 devices listed"
            )
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/healthz", timeout=30) as resp:
                assert resp.status == 200
            proc.send_signal(signal.SIGINT)
            code = proc.wait(30)
            assert code == 0, proc.stdout.read() if proc.stdout else ""
        finally:
            if proc.poll() is None:
                proc.kill()
