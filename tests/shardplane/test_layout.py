"""compose.yaml cannot run here (no Docker engine), so its wiring is checked by parsing it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardplane.cli import SUBCOMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_every_compose_service_runs_a_real_subcommand() -> None:
    services: dict[str, Any] = _compose()["services"]
    ours = {name: svc for name, svc in services.items() if "build" in svc}
    assert {"projector", "planner", "api", "agent"} <= set(ours)
    parser = build_parser()
    for name, svc in ours.items():
        command = svc["command"]
        assert command[0] in SUBCOMMANDS, f"{name}: {command[0]!r} is not a shardplane subcommand"
        parser.parse_args(command)  # exits (SystemExit) on unknown flags
        url = svc["environment"]["NATS_URL"]
        if "ha" in svc.get("profiles", []):  # the HA stack is given every server of the cluster
            assert url.split(",") == [f"nats://nats-{i}:4222" for i in (1, 2, 3)], name
            assert svc["environment"]["SHARDPLANE_REPLICAS"] == "3"
        else:
            assert url.startswith("nats://nats:")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["shardplane"]' in dockerfile
    for package in ("bus", "agents", "projector", "planner", "api", "shardplane"):
        assert f"COPY {package} " in dockerfile


def test_compose_nats_uses_the_repo_config_with_jetstream() -> None:
    services = _compose()["services"]
    nats = services["nats"]
    assert nats["image"].startswith("nats:")
    assert any("nats.conf" in v for v in nats["volumes"])
    conf = (ROOT / "nats.conf").read_text()
    assert "jetstream" in conf
    ha = {n: s for n, s in services.items() if "ha" in s.get("profiles", [])}
    assert sorted(n for n, s in ha.items() if "build" not in s) == ["nats-1", "nats-2", "nats-3"]
    # Secured like the single server: every server reads nats.conf plus the role users
    # (/auth/server.conf), an admin provisions, every service connects as its role.
    for name in ("nats", "nats-1", "nats-2", "nats-3"):
        assert "/auth/server.conf" in services[name]["command"], name
    ours = {str(s["command"][0]) for s in ha.values() if "build" in s}
    assert ours == {"auth", "projector", "planner", "api", "agent"}
    for name, svc in ha.items():
        if "build" in svc and svc["command"][0] != "auth":
            assert "--creds" in svc["command"], name


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shardplane.cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "usage: shardplane" in out.stdout


def test_unknown_benchmark_lists_the_available_ones(capsys: pytest.CaptureFixture[str]) -> None:
    from shardplane.cli import main

    assert main(["bench", "no-such-bench"]) == 2
    assert "no benchmark 'no-such-bench'" in capsys.readouterr().err
