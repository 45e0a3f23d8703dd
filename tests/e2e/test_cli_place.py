"""`place --export/--commit/--wait`, `status --watch` and two `up`s side by side, run as the
processes people type against a real NATS server and the simulated demo fleet."""

from __future__ import annotations

import itertools
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardplane.natsserver import MONITOR_PORT_ENV, NatsServer, free_port
from tests import kit
from tests.kit import api_devices

ROOT = Path(__file__).resolve().parents[2]
CMD = [sys.executable, "-m", "shardplane.cli"]


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "NATS_URL": url, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


def _run(url: str, *argv: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return kit.shardplane_ran(*argv, env=_env(url), timeout=timeout)


def _instances(url: str) -> list[str]:
    out = _run(url, "status", "--json")
    assert out.returncode == 0, out.stderr
    return [i["instance_id"] for i in json.loads(out.stdout)["instances"]]


def _listed(url: str, instance_id: str) -> None:
    """``place`` answers once the planner has published the assignment; ``status`` reads the
    KV, which the projector writes from that assignment a moment later."""
    kit.waited(
        lambda: _instances(url), lambda ids: instance_id in ids, what=f"{instance_id} listed"
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS server with `up` (demo fleet, every service) running against it."""
    with NatsServer(store_dir=tmp_path_factory.mktemp("nats")) as server:
        api_port = free_port()
        proc = subprocess.Popen(
            [*CMD, "up", "--api-port", str(api_port), "--interval", "0.5"],
            cwd=ROOT,
            env=_env(server.url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            kit.until_serving(
                proc, lambda: api_devices(api_port) >= 6, timeout=90, what="the demo fleet reported"
            )
            yield server.url
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_export_is_a_dry_run_unless_commit(fleet: str) -> None:
    out = _run(fleet, "place", "llama-3.2-1b", "--export", "llamacpp", "--instance-id", "exp-dry")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "llama-server -m <model.gguf>" in out.stdout and "-sm layer" in out.stdout
    assert "dry run" in out.stdout
    # Simulated nodes report no address: the heartbeat's hostname is printed, read from the KV.
    assert re.search(r"# on (rig-\w) \(\1\)", out.stdout), out.stdout
    assert "<address of" not in out.stdout
    assert "exp-dry" not in _instances(fleet), "--export alone must not reserve anything"

    out = _run(
        fleet, "place", "llama-3.2-1b", "--export", "llamacpp", "--commit", "--instance-id", "exp-c"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    _listed(fleet, "exp-c")

    out = _run(fleet, "place", "llama-3.2-1b", "--commit")
    assert out.returncode == 2 and "--commit goes with --export" in out.stderr


def test_place_prints_the_plan_and_reserves_it(fleet: str) -> None:
    out = _run(fleet, "place", "llama-3.2-1b", "--instance-id", "plain-1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "llama-3.2-1b" in out.stdout and "instance=plain-1" in out.stdout, out.stdout
    for column in ("stage", "node", "device", "GPU", "layers", "GiB", "est. ms"):
        assert column in out.stdout, f"column {column!r} missing from:\n{out.stdout}"
    _listed(fleet, "plain-1")


def test_place_json_is_the_reply_with_every_layer_placed(fleet: str) -> None:
    out = _run(fleet, "place", "llama-3.2-1b", "--instance-id", "json-1", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    reply = json.loads(out.stdout)
    assert reply["ok"] is True and reply["instance_id"] == "json-1", reply
    stages = reply["stages"]
    assert stages and stages[0]["layer_start"] == 0
    for before, after in itertools.pairwise(stages):
        assert before["layer_end"] == after["layer_start"], stages
    assert stages[-1]["layer_end"] == 16  # llama-3.2-1b's layers
    _listed(fleet, "json-1")


def test_vllm_export_refuses_the_demo_fleets_mixed_plan(fleet: str) -> None:
    # 70B at 16 bits needs the MI250X box next to NVIDIA GPUs on the demo fleet: one vendor
    # per vLLM deployment makes that plan unrunnable, and the command says so.
    out = _run(fleet, "place", "llama-3.1-70b", "--export", "vllm")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "cannot export for vllm" in out.stderr
    assert "one GPU vendor" in out.stderr or "compute capability" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_place_wait_draws_a_bar_per_stage_until_loaded(fleet: str) -> None:
    out = _run(
        fleet, "place", "llama-3.1-8b", "--instance-id", "wait-1", "--max-stages", "2", "--wait"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    final = out.stdout.rsplit("instance wait-1", 1)[1]
    bars = re.findall(r"stage (\d+) .*\[(#+)\]\s+100\.0%.*reserved", final)
    assert len(bars) >= 1, out.stdout
    assert [int(s) for s, _ in bars] == list(range(len(bars)))
    # Piped (not a terminal): no colour and no cursor movement.
    assert "\x1b[" not in out.stdout


def _pty_run(argv: list[str], env: dict[str, str], until: re.Pattern[str]) -> tuple[int, str]:
    """Run under a pseudo-terminal until ``until`` matches its output, then Ctrl-C it."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdin=follower, stdout=follower, stderr=follower
    )
    os.close(follower)
    text = ""
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and not until.search(text):
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                text += os.read(leader, 65536).decode(errors="replace")
        assert until.search(text), text[-2000:]
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
        while select.select([leader], [], [], 0.2)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            text += chunk.decode(errors="replace")
        return code, text
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_place_wait_on_a_terminal_is_coloured(fleet: str) -> None:
    leader, follower = pty.openpty()
    argv = [*CMD, "place", "llama-3.2-1b", "--instance-id", "wait-tty", "--wait"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(fleet), stdout=follower, stderr=follower)
    os.close(follower)
    text = ""
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 90)
            assert ready, text[-2000:]
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal: it has exited
                break
            if not chunk:
                break
            text += chunk.decode(errors="replace")
        assert proc.wait(30) == 0, text[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert "\x1b[32mreserved\x1b[0m" in text, text[-2000:]


def test_status_watch_redraws_in_colour_and_ctrl_c_exits_cleanly(fleet: str) -> None:
    frames = re.compile(r"(shardplane status  every 0\.3 s.*){2}", re.DOTALL)
    code, text = _pty_run([*CMD, "status", "--watch", "-n", "0.3"], _env(fleet), frames)
    assert code == 0, text[-2000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert "\x1b[H\x1b[2J" in text, "a terminal gets the table redrawn in place"
    assert "\x1b[32monline" in text, "online devices in green on a terminal"

    code, text = _pty_run(
        [*CMD, "status", "--watch", "-n", "0.3"], _env(fleet, NO_COLOR="1"), frames
    )
    assert code == 0 and "online" in text
    assert "\x1b[32m" not in text, "NO_COLOR turns colour off even on a terminal"


def test_status_watch_piped_prints_frame_after_frame(fleet: str) -> None:
    proc = subprocess.Popen(
        [*CMD, "status", "--watch", "--json", "--interval", "0.2"],
        cwd=ROOT,
        env=_env(fleet),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        documents = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert all(len(d["devices"]) >= 6 for d in documents)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def _wait_healthy(url: str, timeout: float = 60) -> None:
    def status() -> int | None:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status
        except OSError:
            return None

    kit.waited(status, lambda code: code == 200, timeout=timeout, what=f"{url} healthy")


def test_two_ups_do_not_collide(tmp_path: Path) -> None:
    """Two `up`s on different client ports both get an embedded server; the second finds the
    first one's monitoring port taken and picks another, and each prints its own."""
    preferred = free_port()
    procs: list[subprocess.Popen[str]] = []
    api_ports: list[int] = []
    try:
        for _ in range(2):
            env = _env(f"nats://127.0.0.1:{free_port()}", **{MONITOR_PORT_ENV: str(preferred)})
            api_ports.append(free_port())
            procs.append(
                subprocess.Popen(
                    [*CMD, "up", "--no-agents", "--api-port", str(api_ports[-1])],
                    cwd=tmp_path,  # the embedded stores go under tmp_path/data
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            line = ""
            assert procs[-1].stdout is not None
            while "embedded nats-server: " not in line:
                line = procs[-1].stdout.readline()
                assert line, "up exited before starting its server"
            monitor = int(re.search(r"monitoring http://127\.0\.0\.1:(\d+)/", line).group(1))  # type: ignore[union-attr]
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz", timeout=10) as r:
                assert r.status == 200
            if len(procs) == 1:
                assert monitor == preferred
            else:
                assert monitor != preferred
        for port in api_ports:  # both serve: stop them only once every service is up
            _wait_healthy(f"http://127.0.0.1:{port}/healthz")
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            code = proc.wait(30)
            assert code == 0, proc.stdout.read() if proc.stdout else ""
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
