"""One-shot commands (`place`, `status`) end with a reason instead of retrying forever as the
services do: no NATS after --connect-timeout, or no planner answering."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from shardplane.bus import subjects
from shardplane.natsserver import free_port
from tests import kit

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str, timeout: float = 30.0) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NATS_URL", None)
    started = time.monotonic()
    out = kit.shardplane_ran(*argv, env=env, timeout=timeout)
    return out.returncode, out.stdout + out.stderr, time.monotonic() - started


@pytest.mark.parametrize("command", [["status"], ["place", "llama-3.1-8b"]])
def test_gives_up_on_an_unreachable_nats_with_the_reason(command: list[str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # just freed: nothing listens there
    rc, text, took = _run(*command, "--nats-url", url, "--connect-timeout", "1")
    assert rc == 1, text
    assert f"could not reach NATS at {url}: " in text, text
    # Refused at once, retried every 0.5 s: the count and the time spent, as they were.
    assert re.search(r"\(\d+ failed attempts? in \d+\.\d s\)", text), text
    # 1 s of attempts; the rest is the interpreter starting (slow on a busy machine).
    assert took < 20, took


def test_place_without_a_planner_says_so(nats_url: str) -> None:
    rc, text, _ = _run("place", "llama-3.1-8b", "--nats-url", nats_url)
    assert rc == 1, text
    assert "no planner answers on placement.request" in text, text
    assert "Traceback" not in text, text


async def test_ctrl_c_while_place_waits_for_the_planner_ends_it(nats_url: str) -> None:
    """Once connected, a one-shot command no longer turns Ctrl-C into a stop nobody watches:
    it ends the wait for a planner that never answers, quietly, with 130."""
    nc = await nats.connect(nats_url)
    asked = asyncio.Event()

    async def silent_planner(msg: Msg) -> None:
        asked.set()

    await nc.subscribe(subjects.PLACEMENT_REQUEST, cb=silent_planner)
    await nc.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NATS_URL", None)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "shardplane.cli", "place", "llama-3.1-8b"),
        *("--nats-url", nats_url),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await asyncio.wait_for(asked.wait(), 30)  # connected, and waiting for the reply
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), 15)
        rc, text = proc.returncode, out.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await nc.close()
    assert rc == 130, text
    assert "Traceback" not in text, text
