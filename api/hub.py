"""The status API's shared state: the cluster cache, the SSE hub and the metrics rendition.

The watch, the handlers and the metrics renderer all work on one ``ApiState``; it lives apart from
each of them so that each imports only what they share. The hub fans each change out to every
connected browser through a bounded queue per client, so one slow client can never hold up the
watch or the other clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from nats.aio.client import Client

from shardplane.api.priority import RequestsFirst
from shardplane.api.state import ClusterCache, sse_event

log = logging.getLogger(__name__)

# The longest the watch or the metrics renderer runs before letting requests in: at thousands
# of KV changes a second their work is most of the loop's, and a request waits behind a slice.
LOOP_SLICE_S = 0.002
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(eq=False)  # identity semantics: each connection is its own subscriber
class Subscriber:
    kinds: frozenset[str]
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(maxsize=20_000))
    lagged: bool = False


class Hub:
    """Fan-out of encoded events to SSE clients. A client whose queue fills (it reads slower
    than the cluster changes) gets its backlog dropped and one ``resync`` event, telling it to
    reload the lists, instead of unbounded memory on the server."""

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.sent = 0
        self.dropped = 0

    def publish(self, kind: str, event: bytes) -> None:
        for sub in self.subscribers:
            if kind not in sub.kinds and kind != "resync":
                continue
            try:
                sub.queue.put_nowait(event)
                self.sent += 1
            except asyncio.QueueFull:
                self.dropped += sub.queue.qsize()
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(sse_event("resync", b'{"reason":"client too slow"}'))
                sub.lagged = True

    def close_all(self) -> None:
        for sub in self.subscribers:
            while sub.queue.full():  # the end must get through, even past a backlog
                sub.queue.get_nowait()
            sub.queue.put_nowait(b"")  # the empty event ends the stream


@dataclass(frozen=True)
class Rendition:
    plain: bytes
    gzipped: bytes
    own: bytes  # the API's own figures in it
    version: int  # the MetricsBook version it shows
    built: float


@dataclass
class ApiState:
    nc: Client
    cache: ClusterCache
    hub: Hub
    request_timeout_s: float
    started: float = field(default_factory=time.time)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    watch_restarts: int = 0
    watch_error: str | None = None
    placement_requests: Counter[str] = field(default_factory=lambda: Counter[str]())
    watch_task: asyncio.Task[None] | None = None
    metrics: Rendition | None = None
    last_scrape: float = 0.0
    ttl_s: float | None = None  # liveness TTL for judging staleness (None: per node)
    watcher: Any = None  # the current KV watch (bus.watchguard stops it when it stalls)
    watched: int = 0  # the highest stream sequence the watch delivered, any key
    priority: RequestsFirst = field(default_factory=RequestsFirst)  # large bodies before the watch


STATE_KEY = web.AppKey("shardplane_api", ApiState)
