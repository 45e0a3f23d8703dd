"""The wheel installs one top-level package, `shardplane`, with its data, and runs from it.

Installing shardplane next to any other distribution that ships a top-level `api` or `bench`
used to break one of them; and an installed `up`/`demo` missed its default fleet. This builds
the wheel from the checkout, installs it into a folder outside the checkout and runs the demo
from there, so a file the package needs but the wheel lacks fails here, not on a user's machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shardplane.natsserver import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("bus", "agents", "projector", "planner", "api", "bench")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (built,) = out.glob("shardplane-*.whl")
    return built


def test_the_wheel_has_one_top_level_package_and_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"shardplane", next(t for t in top if t.endswith(".dist-info"))}, top
    for component in COMPONENTS:
        assert f"shardplane/{component}/__init__.py" in names, component
    for data in ("shardplane/fleets/demo.toml", "shardplane/nats.conf"):
        assert data in names, data
    assert any(n.startswith("shardplane/api/static/") for n in names)


def test_demo_runs_from_the_installed_wheel_outside_the_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), wheel],
        check=True,
        capture_output=True,
        timeout=120,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    # The wheel's folder goes first on the path, so the checkout (reachable through the
    # editable install of this venv) cannot stand in for a file the wheel lacks.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import shardplane.bus, shardplane.planner as p; print(p.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout
    with NatsServer(store_dir=tmp_path / "nats") as server:
        api_port = free_port()
        out = subprocess.run(
            [sys.executable, "-m", "shardplane.cli", "demo", "--once", "--api-port", str(api_port)],
            cwd=work,
            env={**env, "NATS_URL": server.url},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "llama-3.1-70b" in out.stdout
    assert f"http://127.0.0.1:{api_port}/" in out.stdout
