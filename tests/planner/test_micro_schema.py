"""The planner's NATS micro service answers ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` as
the micro v1 JSON schemas say (ADR-32), so the nats CLI and other tools that validate them
(``nats micro stats``, monitoring) accept it.

The schemas in tests/planner/schemas/ are copied unchanged from nats-io/jsm.go
(schemas/micro/v1/*.json, commit caea3c5246c7b5cb5a4fff0c7288046b2a6bae87, Apache-2.0), the
files the nats CLI validates against. Before jsm.go commit b0162b5 (September 2023) the stats
schema required each endpoint's ``data`` to be an object; CLIs built on it are still around, and
nats-py sends ``null`` unless a stats handler gives one, so both versions are checked.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator, FormatChecker, ValidationError
from nats.aio.client import Client
from nats.js import JetStreamContext

from tests.planner.fleetkit import DEMO, publish_fleet
from tests.planner.ready import SERVICE
from tests.planner.test_service import ask, planner_running

SCHEMAS = Path(__file__).parent / "schemas"


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"micro_v1_{name}.json").read_text())


def stats_before_2023_09() -> dict[str, Any]:
    old = copy.deepcopy(schema("stats_response"))
    old["properties"]["endpoints"]["items"]["properties"]["data"]["type"] = "object"
    return old


def validate(doc: dict[str, Any], against: dict[str, Any]) -> None:
    Draft7Validator(against, format_checker=FormatChecker()).validate(doc)


async def verb(nc: Client, name: str) -> dict[str, Any]:
    msg = await nc.request(f"$SRV.{name}.{SERVICE}", b"", timeout=30)
    return json.loads(msg.data)


async def test_srv_replies_are_valid_micro_v1(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    await publish_fleet(js, DEMO)
    async with planner_running(nats_url):
        assert (await ask(nc, {"model": "llama-3.1-8b", "dry_run": True})).ok
        stats = await verb(nc, "STATS")
        validate(stats, schema("stats_response"))
        validate(stats, stats_before_2023_09())
        validate(await verb(nc, "INFO"), schema("info_response"))
        validate(await verb(nc, "PING"), schema("ping_response"))
    endpoints = {e["name"]: e for e in stats["endpoints"]}
    assert {"request", "release"} <= set(endpoints), endpoints
    assert stats["type"] == "io.nats.micro.v1.stats_response"
    endpoint = endpoints["request"]
    assert endpoint["num_requests"] >= 1 and endpoint["num_errors"] == 0
    # The data is the fleet the planner plans on: the demo's hosts and devices (every
    # endpoint's, an object each).
    for e in endpoints.values():
        data = e["data"]
        assert data["nodes"] == len(DEMO) and data["devices"] == data["devices_online"] > 0
    # RFC 3339 with a zone, as the schema's date-time asks (checked here whether or not the
    # format checker has its optional RFC 3339 parser).
    assert datetime.fromisoformat(stats["started"].replace("Z", "+00:00")).tzinfo is not None


def test_the_schemas_catch_what_nats_py_sends_without_a_stats_handler() -> None:
    """nats-py's default endpoint ``data`` (null) fails the older schema: the check can fail."""
    reply: dict[str, Any] = {
        "type": "io.nats.micro.v1.stats_response",
        "name": "shardplane-planner",
        "id": "abc",
        "version": "0.1.0",
        "metadata": {},
        "started": "2026-01-01T00:00:00.000Z",
        "endpoints": [
            {
                "name": "request",
                "subject": "placement.request",
                "queue_group": "q",
                "num_requests": 1,
                "num_errors": 0,
                "last_error": "",
                "processing_time": 5,
                "average_processing_time": 5,
                "data": None,
            }
        ],
    }
    validate(reply, schema("stats_response"))
    with pytest.raises(ValidationError, match="None is not of type 'object'"):
        validate(reply, stats_before_2023_09())
    reply["version"] = "1"
    with pytest.raises(ValidationError, match="version"):
        validate(reply, schema("stats_response"))
