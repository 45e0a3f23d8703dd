"""One way to connect: NATS_URL (default nats://127.0.0.1:4222), reconnect forever with backoff,
credentials from NATS_CREDS / NATS_USER+NATS_PASSWORD / NATS_TOKEN when configured."""

from __future__ import annotations

import logging
import os
from typing import Any

import nats
from nats.aio.client import Client

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"


def nats_url(url: str | None = None) -> str:
    return url or os.environ.get("NATS_URL") or DEFAULT_URL


async def connect(url: str | None = None, name: str = "shardplane", **overrides: Any) -> Client:
    client: list[Client] = []

    def closing() -> bool:
        return bool(client) and (client[0].is_closed or client[0].is_draining)

    async def on_error(exc: Exception) -> None:
        if not closing():
            log.warning("nats (%s): %s", name, exc)

    async def on_disconnected() -> None:
        # nats-py calls this on a deliberate close too; only a lost connection is news.
        if not closing():
            log.info("nats (%s): disconnected; reconnecting", name)

    async def on_reconnected() -> None:
        log.info("nats (%s): reconnected", name)

    options: dict[str, Any] = {
        "servers": [u.strip() for u in nats_url(url).split(",")],
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "allow_reconnect": True,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        "pending_size": 64 * 1024 * 1024,
    }
    if creds := os.environ.get("NATS_CREDS"):
        options["user_credentials"] = creds
    if user := os.environ.get("NATS_USER"):
        options["user"] = user
        options["password"] = os.environ.get("NATS_PASSWORD", "")
    if token := os.environ.get("NATS_TOKEN"):
        options["token"] = token
    options.update(overrides)
    nc = await nats.connect(**options)
    client.append(nc)
    return nc
