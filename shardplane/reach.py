"""Connecting to NATS without outliving a stop.

A service started before its NATS server keeps retrying (as ``bus.connect`` does, so compose and
systemd start orders do not matter), but SIGTERM/SIGINT must still end it at once, with a
message that says which URL never answered and why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

from nats.aio.client import Client

from shardplane.bus.connect import connect
from shardplane.bus.errors import CommandError

log = logging.getLogger(__name__)


class NatsUnreachable(CommandError, RuntimeError):
    """Stopped before the first connection to ``url`` succeeded."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"could not reach NATS at {redact(url)}: {reason}")
        self.url = url
        self.reason = reason


def redact(url: str) -> str:
    """``url`` without passwords or tokens, fit for a message (it may list several servers)."""
    out: list[str] = []
    for server in url.split(","):
        parts = urlsplit(server.strip())
        if "@" in parts.netloc:  # user:password@ or token@
            parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
        out.append(parts.geturl())
    return ",".join(out)


def _describe(exc: BaseException) -> str:
    # asyncio.TimeoutError and some nats errors have an empty str(); the type says enough then.
    return str(exc) or type(exc).__name__


class _Errors:
    """The client's error callback (a bound coroutine method: nats-py accepts nothing else).

    Before the first connection it keeps the last error for NatsUnreachable and logs each
    distinct reason once: nats-py retries every 0.5 s, and the same 'connection refused' twice a
    second buries everything else. Once connected it logs every error, except those a deliberate
    close or drain produces."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client: Client | None = None
        self.last: BaseException | None = None
        self.failures = 0

    async def on_error(self, exc: Exception) -> None:
        client = self.client
        if client is None:
            self.failures += 1
            if self.last is None or _describe(exc) != _describe(self.last):
                log.warning("nats (%s): %s; retrying until it answers", self.name, _describe(exc))
            self.last = exc
        elif not (client.is_closed or client.is_draining):
            log.warning("nats (%s): %s", self.name, _describe(exc))

    def reason(self, waited_s: float) -> str:
        if self.last is None:
            return f"no answer yet after {waited_s:.1f} s (stopped during the first attempt)"
        tries = "attempt" if self.failures == 1 else "attempts"
        return f"{_describe(self.last)} ({self.failures} failed {tries} in {waited_s:.1f} s)"


async def connect_unless_stopped(
    url: str, stop: asyncio.Event, name: str, creds: Path | None = None
) -> Client:
    """A connection to ``url``, retried until it succeeds; NatsUnreachable if ``stop`` is set
    first. Other connect errors (bad URL, unreadable credentials) propagate as they are."""
    errors = _Errors(name)
    started = time.monotonic()
    connecting = asyncio.ensure_future(
        connect(url, name=name, creds=creds, error_cb=errors.on_error)
    )
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((connecting, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            # Let the cancellation land, so no half-open socket outlives the stop.
            await asyncio.wait((connecting,))
    if connecting.cancelled():
        raise NatsUnreachable(url, errors.reason(time.monotonic() - started))
    # Connected (even if stop was set in the same instant: the caller sees stop and closes it),
    # or failed for good, which raises here.
    client = connecting.result()
    errors.client = client
    return client
