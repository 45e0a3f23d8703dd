"""The commands people type, run as processes against a real NATS server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from shardplane.natsserver import NatsServer, free_port
from tests.kit import api_devices

ROOT = Path(__file__).resolve().parents[2]


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "NATS_URL": url, "PYTHONUNBUFFERED": "1"}


def _shardplane(*args: str) -> list[str]:
    return [sys.executable, "-m", "shardplane.cli", *args]


def test_demo_once_prints_the_placement_table_and_exits(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "nats") as server:
        api_port = free_port()
        out = subprocess.run(
            _shardplane("demo", "--once", "--api-port", str(api_port)),
            cwd=ROOT,
            env=_env(server.url),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
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
        status = subprocess.run(
            _shardplane("status", "--json"),
            cwd=ROOT,
            env=_env(server.url),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        state = json.loads(status.stdout)
        assert len(state["devices"]) >= 6
        assert state["instances"], "the demo's instance is in the KV"


def test_up_serves_the_api_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "nats") as server:
        api_port = free_port()
        proc = subprocess.Popen(
            _shardplane("up", "--api-port", str(api_port), "--interval", "0.5"),
            cwd=ROOT,
            env=_env(server.url),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            devices = 0
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                if (devices := api_devices(api_port)) >= 6:
                    break
                time.sleep(0.3)
            assert devices >= 6, devices
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/healthz", timeout=30) as resp:
                assert resp.status == 200
            proc.send_signal(signal.SIGINT)
            code = proc.wait(30)
            assert code == 0, proc.stdout.read() if proc.stdout else ""
        finally:
            if proc.poll() is None:
                proc.kill()
