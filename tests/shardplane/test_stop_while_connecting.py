"""A service command whose NATS never answers still stops at once on SIGTERM/SIGINT, and says
which URL it could not reach."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardplane.natsserver import free_port

ROOT = Path(__file__).resolve().parents[2]


def _read_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    """Output so far, once it contains ``needle`` (fails after ``timeout`` s or if it exits)."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while needle not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {needle!r} within {timeout} s; output so far: {seen!r}"
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"exited ({proc.wait()}) before {needle!r}: {seen!r}"
                seen += chunk
    return seen


@pytest.mark.parametrize(
    ("command", "signame"),
    [
        ("projector", "SIGTERM"),
        ("projector", "SIGINT"),
        ("planner", "SIGTERM"),
        ("api", "SIGTERM"),
        ("agent", "SIGTERM"),
    ],
)
def test_service_stops_promptly_while_nats_never_answers(command: str, signame: str) -> None:
    sig = signal.Signals[signame]
    url = f"nats://127.0.0.1:{free_port()}"  # just freed: nothing listens there
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NATS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardplane.cli", command, "--nats-url", url],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # The first refused attempt is logged after the signal handlers are installed, so the
        # signal below lands on the service, not on Python's default handler.
        out = _read_until(proc, b"nats (shardplane-", timeout=30)
        sent = time.monotonic()
        proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command} still running 10 s after {sig.name}")
        took = time.monotonic() - sent
        assert proc.stdout is not None
        out += proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert took < 3.0, f"{command} took {took:.1f} s to stop after {sig.name}:\n{text}"
    assert rc == 1, f"{command} exited {rc} after {sig.name}, want 1:\n{text}"
    assert f"could not reach NATS at {url}: " in text, text
    assert "Traceback" not in text, text
