"""One way to connect: NATS_URL (default nats://127.0.0.1:4222), reconnect forever with backoff,
credentials from ``creds`` / NATS_CREDS / NATS_USER+NATS_PASSWORD / NATS_TOKEN when configured.

A credentials file is either a NATS JWT ``.creds`` file (decentralised auth, passed on as is)
or one written by ``shardplane auth`` (``bus.auth``): then the connection signs with its nkey,
uses its role's private inbox prefix, and is remembered as that role (so a non-admin role never
tries to provision streams)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"


def nats_url(url: str | None = None) -> str:
    return url or os.environ.get("NATS_URL") or DEFAULT_URL


JWT_MARKER = "BEGIN NATS USER JWT"


def credential_options(path: str | Path) -> tuple[dict[str, Any], Any]:
    """nats-py options for the credentials file at ``path``, and its shardplane credentials
    (None for a JWT .creds file). Raises AuthError when the file is neither."""
    from shardplane.bus.auth import AuthError, read_credentials

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AuthError(f"cannot read credentials {path}: {exc.strerror}") from None
    if JWT_MARKER in text:
        return {"user_credentials": str(path)}, None
    creds = read_credentials(path)
    return {"nkeys_seed_str": creds.seed, "inbox_prefix": creds.inbox}, creds


async def connect(
    url: str | None = None,
    name: str = "shardplane",
    creds: str | Path | None = None,
    **overrides: Any,
) -> Client:
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
    ours: Any = None
    if creds_file := creds or os.environ.get("NATS_CREDS"):
        extra, ours = credential_options(creds_file)
        options.update(extra)
    if user := os.environ.get("NATS_USER"):
        options["user"] = user
        options["password"] = os.environ.get("NATS_PASSWORD", "")
    if token := os.environ.get("NATS_TOKEN"):
        options["token"] = token
    options.update(overrides)
    nc = await nats.connect(**options)
    client.append(nc)
    if ours is not None:
        from shardplane.bus.auth import remember_role

        remember_role(nc, ours.role)
    return nc
