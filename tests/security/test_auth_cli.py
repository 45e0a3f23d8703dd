"""`shardplane auth`: the folder of role credentials and the server config it renders."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from shardplane.bus import auth
from shardplane.cli import main
from shardplane.projector.lease import LEASE_BUCKET
from shardplane.projector.service import CONSUMERS


def test_init_and_add_node(tmp_path: Path) -> None:
    folder = tmp_path / "auth"
    assert main(["auth", "init", str(folder), "--node", "gpu-1"]) == 0
    users = auth.load_dir(folder)
    assert set(users) == {"admin", "projector", "planner", "controller", "api"} | {
        "agent-gpu-1",
        "worker-gpu-1",
    }
    assert users["agent-gpu-1"].nodes == ("gpu-1",)
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    conf = (folder / auth.AUTH_CONF).read_text()
    assert conf.count("nkey:") == 7
    assert not any(c.seed in conf for c in users.values())  # public keys only, never a seed
    assert users["planner"].public_key in conf
    seed_before = users["admin"].seed
    assert main(["auth", "add-node", str(folder), "gpu-2"]) == 0
    users = auth.load_dir(folder)
    assert users["admin"].seed == seed_before  # existing keys are never replaced
    assert (
        "worker-gpu-2" in users and "telemetry.gpu.gpu-2.*" in (folder / auth.AUTH_CONF).read_text()
    )
    assert main(["auth", "add-node", str(folder), "Bad Node"]) == 2


def test_credentials_file_round_trip_and_errors(tmp_path: Path) -> None:
    creds = auth.new_credentials("agent", ("n1", "n2"), user="agent-x")
    assert auth.parse_credentials(creds.text()) == creds
    broken = tmp_path / "x.creds"
    broken.write_text("# role: agent\nnot-a-seed\n")
    try:
        auth.read_credentials(broken)
    except auth.AuthError as exc:
        assert "no user nkey seed" in str(exc)
    else:
        raise AssertionError("a file without a seed was accepted")


def test_names_shared_with_the_components_agree() -> None:
    assert auth.LEASE_BUCKET == LEASE_BUCKET
    assert {auth.PROJECTOR_DURABLE.format(stream=s.lower()) for s in CONSUMERS} == set(
        CONSUMERS.values()
    )


def test_a_broken_credentials_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.creds"
    bad.write_text("garbage\n")
    monkeypatch.setenv("NATS_CREDS", "")  # restored after: main() sets it from --creds
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")
    assert main(["status", "--creds", str(bad)]) == 2
    assert "no `# role:` line" in capsys.readouterr().err


def test_api_beyond_loopback_without_a_token_refuses_before_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SHARDPLANE_API_TOKEN", raising=False)
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")  # never reached: it refuses first
    assert main(["api", "--host", "0.0.0.0"]) == 2
    assert main(["up", "--no-auth", "--api-host", "0.0.0.0", "--no-agents"]) == 2
    err = capsys.readouterr().err
    assert err.count("refusing to serve the API on '0.0.0.0' without a token") == 2
