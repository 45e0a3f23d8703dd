"""Riding through JetStream leader elections.

On a cluster, killing the server that leads a stream (or the KV bucket behind it) leaves that
stream without a leader for a few seconds (typically 4-9 s) while the survivors elect one.
Meanwhile every request to it fails in one of a handful of ways (no responders, a timeout,
a 503 "temporarily unavailable", the connection reconnecting to another server), and none of
them means the request was wrong: asked again a little later, it works. nats-py does not
retry, so each caller would otherwise fail (or log a traceback) for every message of the
outage.

:func:`retrying` runs one operation again with backoff until it works or a deadline
(:data:`ELECTION_DEADLINE_S`, longer than an election) passes, and logs an outage once when it
starts and once when it ends rather than once per failed attempt. The operation itself must
be safe to repeat: a publish keeps its ``Nats-Msg-Id`` (the stream drops a repeat), and a
compare-and-set whose answer was lost is settled by :func:`landed` (re-read: did my write
land?).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors

log = logging.getLogger(__name__)

T = TypeVar("T")

ELECTION_DEADLINE_S = 20.0  # >= 15 s: longer than any election we measured (4-9 s)
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0

# Server answers that mean "not now", not "no": 503 unavailable, 500 (a leader change mid-call),
# 408 (a request that timed out inside the cluster).
_TRANSIENT_CODES = frozenset({408, 500, 503})
# JetStream error codes seen while a stream or the meta layer has no leader.
_TRANSIENT_ERR_CODES = frozenset(
    {
        10008,  # JetStream system temporarily unavailable
        10118,  # stream is offline
        10150,  # stream leader not found / no quorum (varies by version)
    }
)


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is what a request gets while a leader is being elected or the client is
    moving to another server: asking again later may work."""
    if isinstance(
        exc,
        (
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            TimeoutError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.StaleConnectionError,
            nats.errors.UnexpectedEOF,
            nats.js.errors.ServiceUnavailableError,
            nats.js.errors.ServerError,
            nats.js.errors.NoStreamResponseError,
        ),
    ):
        return True
    if isinstance(exc, nats.js.errors.KeyValueError | nats.js.errors.NotFoundError):
        return False  # a missing key or a wrong revision is an answer, not an outage
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code in _TRANSIENT_CODES or exc.err_code in _TRANSIENT_ERR_CODES
    return False


class Outage:
    """Logs an outage of one kind once when it begins and once when it ends."""

    def __init__(self, what: str, logger: logging.Logger | None = None) -> None:
        self.what = what
        self.log = logger or log
        self.since: float | None = None
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning(
                "%s: %s (a leader election or a server lost?); retrying",
                self.what,
                describe(exc),
            )

    def recovered(self) -> None:
        if self.since is not None:
            self.log.info(
                "%s: working again after %.1f s (%d failed attempts)",
                self.what,
                time.monotonic() - self.since,
                self.failures,
            )
            self.since = None
            self.failures = 0


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def retrying(
    operation: Callable[[], Awaitable[T]],
    what: str,
    *,
    deadline_s: float = ELECTION_DEADLINE_S,
    outage: Outage | None = None,
) -> T:
    """``await operation()``, again after a transient failure with jittered exponential
    backoff until ``deadline_s`` has passed; the last failure is raised then. Other errors are
    raised at once."""
    watch = outage or Outage(what)
    give_up = time.monotonic() + deadline_s
    backoff = FIRST_BACKOFF_S
    while True:
        try:
            result = await operation()
        except Exception as exc:
            if not transient(exc) or time.monotonic() >= give_up:
                raise
            watch.failed(exc)
            pause = min(backoff, max(0.0, give_up - time.monotonic()))
            await asyncio.sleep(pause * random.uniform(0.5, 1.0))
            backoff = min(MAX_BACKOFF_S, backoff * 2)
            continue
        watch.recovered()
        return result
