"""The HTTP API: reads open, changes need the bearer token, no token means loopback only,
and aiohttp's own refusals answer in the JSON error shape."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator

import aiohttp
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.api.auth import InsecureBinding, check_binding
from shardplane.api.server import make_app, run_api, start_app

TOKEN = "s3cret-token"


@pytest.fixture
async def api(nc: Client, js: JetStreamContext) -> AsyncGenerator[str, None]:
    runner, url = await start_app(make_app(nc, request_timeout_s=2.0, token=TOKEN))
    try:
        yield url
    finally:
        await runner.cleanup()


async def _post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/api/placements", data=body, headers=headers) as response,
    ):
        return response.status, json.loads(await response.read())


async def test_changes_need_the_token_reads_do_not(api: str) -> None:
    body = b'{"model":"llama-3.1-8b","dry_run":true}'
    status, doc = await _post(api, {}, body)
    assert status == 401 and doc["ok"] is False
    assert "Authorization: Bearer" in str(doc["error"])
    status, doc = await _post(api, {"Authorization": "Bearer wrong"}, body)
    assert status == 403
    # With the token the request goes through to the bus (no planner here: 503, not 401).
    status, doc = await _post(api, {"Authorization": f"Bearer {TOKEN}"}, body)
    assert status == 503 and doc["error"]["code"] == "unavailable"  # type: ignore[index]
    async with aiohttp.ClientSession() as http, http.get(f"{api}/api/nodes") as response:
        assert response.status == 200


async def test_bad_body_error_echoes_the_request(api: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    status, doc = await _post(api, headers, b'{"model":"m-1","instance_id":"inst-7","batchh":2}')
    assert status == 400
    assert doc["instance_id"] == "inst-7" and doc["model"] == "m-1"
    status, doc = await _post(api, headers, b'{"model":' + b"[" * 2000 + b"]" * 2000 + b"}")
    assert status == 400 and "levels deep" in str(doc["error"])


async def test_aiohttp_own_400_is_json(api: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{api}/api/nodes?" + "a" * 9000) as response:
            assert response.status == 400
            doc = json.loads(await response.read())
        async with http.get(f"{api}/api/nodes", headers={"X-Big": "b" * 9000}) as response:
            assert response.status == 400
            big = json.loads(await response.read())
    assert doc["ok"] is False and doc["error"]["code"] == "invalid_request"
    assert "malformed HTTP request" in doc["error"]["message"]
    assert big["error"]["code"] == "invalid_request"


def test_binding_beyond_loopback_needs_a_token() -> None:
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    check_binding("0.0.0.0", "t")
    with pytest.raises(InsecureBinding, match="SHARDPLANE_API_TOKEN"):
        check_binding("0.0.0.0", None)


async def test_run_api_refuses_to_start_open_on_the_network(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHARDPLANE_API_TOKEN", raising=False)
    with pytest.raises(InsecureBinding, match=r"refusing to serve the API on '0\.0\.0\.0'"):
        await asyncio.wait_for(run_api(nc, stop=asyncio.Event(), host="0.0.0.0", port=0), 5)
