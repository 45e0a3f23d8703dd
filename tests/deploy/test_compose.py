"""compose.yaml: valid against the Compose Specification's JSON schema, with healthchecks that
work and a NATS monitor port that the published port reaches.

compose-spec.json is copied unchanged from compose-spec/compose-spec (schema/compose-spec.json,
commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0). No Docker here: the nats
service's command runs with the real nats-server binary (container paths and ports swapped for
local ones), and the API's healthcheck command runs against the real API.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator, ValidationError
from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.api.server import make_app, start_app
from shardplane.bus import auth
from shardplane.bus.streams import cluster_state
from shardplane.natsserver import NatsServer, free_port, server_binary
from tests.kit import waited

ROOT = Path(__file__).resolve().parents[2]
SPEC = Path(__file__).parent / "compose-spec.json"


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def validator() -> Draft7Validator:
    return Draft7Validator(json.loads(SPEC.read_text()))


def test_compose_yaml_is_valid_compose_spec() -> None:
    doc = compose()
    validator().validate(doc)
    # The check can fail: a misspelt key or a wrong type is caught.
    broken = copy.deepcopy(doc)
    broken["services"]["api"]["depends_on"]["nats"]["condition"] = "service_ready"
    with pytest.raises(ValidationError, match="service_ready"):
        validator().validate(broken)
    broken = copy.deepcopy(doc)
    broken["services"]["nats"]["helthcheck"] = broken["services"]["nats"].pop("healthcheck")
    with pytest.raises(ValidationError, match="helthcheck"):
        validator().validate(broken)


def test_services_wait_for_healthy_nats_and_check_readiness() -> None:
    services = compose()["services"]
    nats_check = services["nats"]["healthcheck"]["test"]
    assert nats_check[0] == "CMD" and "http://127.0.0.1:8222/healthz" in nats_check
    assert services["nats"]["image"].endswith("-alpine")  # it has the wget the check runs
    # Published on the host's loopback only (the security issue): the monitor port still works.
    assert "127.0.0.1:8222:8222" in services["nats"]["ports"]
    api_check = services["api"]["healthcheck"]["test"]
    assert api_check[:2] == ["CMD", "python"] and "/readyz" in api_check[-1]
    for name in ("provision", "projector", "planner", "api", "agent"):
        assert services[name]["depends_on"] == {"nats": {"condition": "service_healthy"}}, name


def monitor(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.status, r.read()


def wait_monitor(port: int, path: str, timeout: float = 20.0) -> tuple[int, bytes]:
    def answer() -> tuple[int, bytes] | None:
        try:
            return monitor(port, path)
        except OSError:  # not listening yet
            return None

    got = waited(answer, lambda a: a is not None, timeout=timeout, what=f"monitor {path}")
    assert got is not None
    return got


def test_the_nats_service_command_opens_its_monitor_on_every_interface() -> None:
    """nats.conf once said ``http: 127.0.0.1:8222``, which ``-m 8222`` cannot move off
    loopback (nats-server has no flag for the monitor's host), so the published port reached
    nothing. The compose command, run as is, must bind the monitor where ``-a`` says."""
    command = list(compose()["services"]["nats"]["command"])
    client, mon = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="shardplane-compose-") as store:
        # /auth/server.conf is what `shardplane auth init data/auth --base-config nats.conf`
        # writes on the host: nats.conf followed by the role users.
        auth.init_dir(Path(store) / "auth", base_config=ROOT / "nats.conf")
        server_conf = Path(store) / "auth" / auth.SERVER_CONF
        swap = {"/auth/server.conf": str(server_conf), "/data": store, "8222": str(mon)}
        args = [str(swap.get(a, a)) for a in command] + ["-p", str(client)]
        proc = subprocess.Popen([str(server_binary()), *args], stderr=subprocess.PIPE)
        try:
            status, body = wait_monitor(mon, "/healthz")  # what the healthcheck asks
            assert status == 200 and json.loads(body)["status"] == "ok"
            varz = json.loads(monitor(mon, "/varz")[1])
            assert (varz["http_host"], varz["http_port"]) == ("0.0.0.0", mon)
            assert varz["jetstream"]["config"]["store_dir"].startswith(store)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_the_embedded_server_keeps_its_monitor_on_loopback() -> None:
    mon = free_port()
    with NatsServer(config=ROOT / "nats.conf", monitor_port=mon):
        varz = json.loads(wait_monitor(mon, "/varz")[1])
    assert (varz["http_host"], varz["http_port"], varz["host"]) == ("127.0.0.1", mon, "127.0.0.1")


async def run_check(test: list[str], port: int) -> int:
    """The healthcheck's CMD, pointed at ``port``, run without blocking the API's loop."""
    assert test[0] == "CMD" and test[1] == "python"
    argv = [sys.executable, *[a.replace(":8080/", f":{port}/") for a in test[2:]]]
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 30)


async def test_the_api_healthcheck_follows_readyz(nc: Client, js: JetStreamContext) -> None:
    import nats

    await cluster_state(js)
    client = await nats.connect(nc.connected_url.geturl() if nc.connected_url else "")
    runner, url = await start_app(make_app(client))
    port = int(url.rsplit(":", 1)[1])
    test = compose()["services"]["api"]["healthcheck"]["test"]
    try:
        assert await run_check(test, port) == 0
        await client.close()  # no NATS: /readyz answers 503, the check fails
        assert await run_check(test, port) == 1
    finally:
        await runner.cleanup()


def test_dockerignore_keeps_the_build_context_small_and_complete() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "data", ".git"} <= ignored
    # Nothing the Dockerfile copies is left out of the context.
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert source not in ignored and (ROOT / source).exists(), source
