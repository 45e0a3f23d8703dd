"""The command behaves like other Unix tools: --version, --json wherever it prints data, quiet on
a closed pipe, colour only on a terminal and never with NO_COLOR, a README that lists exactly
the commands --help lists, and an embedded server that steps aside from ports already taken."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shardplane import render
from shardplane.cli import SUBCOMMANDS, build_parser
from shardplane.natsserver import (
    MONITOR_PORT_ENV,
    NatsServer,
    embedded_for,
    free_port,
    port_or_free,
)
from tests import kit

ROOT = Path(__file__).resolve().parents[2]


def _cli(
    *argv: str, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return kit.shardplane_ran(*argv, env=env, timeout=60, **kw)


def test_version() -> None:
    out = _cli("--version")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"shardplane \d+\.\d+\.\d+\S*\n", out.stdout), out.stdout


def test_models_json_is_the_catalog_with_its_sizes() -> None:
    out = _cli("models", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    by_name = {r["name"]: r for r in rows}
    card = by_name["llama-3.1-8b"]
    assert card["layers"] == 32 and card["hidden"] == 4096
    # 8B parameters at 2 bytes each: the derived figures are in base units.
    assert 7.5e9 < card["params"] < 8.5e9
    assert 14e9 < card["weight_bytes"] < 17e9
    # The table shows the same models.
    table = _cli("models").stdout
    assert all(name in table for name in by_name)


def test_every_data_command_takes_json() -> None:
    parser = build_parser()
    for argv in (["place", "m", "--json"], ["status", "--json"], ["models", "--json"]):
        assert parser.parse_args(argv).json is True, argv


def test_a_closed_pipe_ends_quietly_like_sigpipe() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written (`| head` that exited)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "shardplane.cli", "models"],
            cwd=ROOT,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert out.stderr == "", out.stderr  # no BrokenPipeError traceback
    assert out.returncode == 128 + 13  # what a shell reports for a SIGPIPE death


def test_models_into_head_prints_no_traceback() -> None:
    shell = f"{sys.executable} -m shardplane.cli models | head -n 1"
    out = subprocess.run(
        ["sh", "-c", shell], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.startswith("model"), out.stdout
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color() -> None:
    assert render.colour_enabled(_Tty(), {})
    assert not render.colour_enabled(_Tty(), {"NO_COLOR": "1"})
    assert not render.colour_enabled(io.StringIO(), {})
    # no-color.org: an empty NO_COLOR does not count.
    assert render.colour_enabled(_Tty(), {"NO_COLOR": ""})
    assert render.paint("ok", "green", False) == "ok"
    assert render.paint("ok", "green", True) == "\x1b[32mok\x1b[0m"


def test_painted_cells_still_line_up() -> None:
    plain = render.table(("a", "b"), [("online", 1), ("OFFLINE (gone)", 2)])
    painted = render.table(
        ("a", "b"),
        [
            (render.paint("online", "green", True), 1),
            (render.paint("OFFLINE (gone)", "red", True), 2),
        ],
    )
    assert re.sub(r"\x1b\[[0-9;]*m", "", painted) == plain


def _readme_commands() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split(" | ")[0]
        for span in re.findall(r"`([^`]+)`", first_cell):
            words = span.split()
            names.add(words[1] if words[0] == "shardplane" and len(words) > 1 else words[0])
    return names


def _help_commands() -> set[str]:
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split("COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    return {m.group(1) for m in re.finditer(r"^ {4}(\w+)", listed, re.MULTILINE)}


def test_readme_commands_table_matches_help() -> None:
    in_help = _help_commands()
    assert in_help == set(SUBCOMMANDS), in_help
    in_readme = _readme_commands()
    assert in_help - in_readme == set(), f"in --help, missing from README: {in_help - in_readme}"
    assert in_readme - in_help == set(), f"in README, not in --help: {in_readme - in_help}"


def test_a_taken_port_is_swapped_for_a_free_one() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        other = port_or_free(taken)
        assert other != taken
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", other))  # the replacement really is free
    spare = free_port()
    assert port_or_free(spare) == spare


def test_embedded_server_monitor_port_steps_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setenv(MONITOR_PORT_ENV, str(taken))
        server = embedded_for(f"nats://127.0.0.1:{free_port()}")
        assert server is not None
        assert server.monitor_port not in (None, taken)
        assert f"nats-{server.port}" in str(server.store_dir)  # its own store, too


def test_status_on_a_fresh_server_and_a_watch_into_head(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "nats") as server:
        env = {**os.environ, "NATS_URL": server.url}
        out = _cli("status", env=env)
        # No KV bucket yet (nothing provisioned it): an empty cluster, said plainly.
        assert out.returncode == 0, out.stderr
        assert "0 nodes, 0 devices" in out.stdout and "nothing in the KV yet" in out.stdout
        shell = (
            f"{sys.executable} -m shardplane.cli status --watch -n 0.1 | head -n 1; "
            'echo "status=${PIPESTATUS[0]}"'
        )
        out = subprocess.run(
            ["bash", "-c", shell], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert out.stdout.startswith("shardplane status  every 0.1 s"), out.stdout
        assert "status=141" in out.stdout and out.stderr == "", out.stderr
