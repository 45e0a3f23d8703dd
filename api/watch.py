"""The one background task that watches the whole ``cluster_state`` bucket into the cache.

Handlers only read the cache; this is the only writer. It yields to requests every
``LOOP_SLICE_S`` (thousands of changes a second would otherwise hold the loop) and waits while a
large body is sent (api.priority), restarts a watch that stalls, and marks entries stale that
the projector stopped refreshing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js.errors import BadRequestError, NotFoundError

from shardplane.api.hub import LOOP_SLICE_S, ApiState
from shardplane.api.state import Change, sse_event
from shardplane.bus.kvfeed import KvFeed, Update
from shardplane.bus.streams import CLUSTER_STATE, kv_stream, provision
from shardplane.bus.watchguard import guard_watch

log = logging.getLogger(__name__)

# --- the watch ------------------------------------------------------------------------------


async def _feed(state: ApiState) -> KvFeed:
    js = state.nc.jetstream()
    try:
        return await KvFeed.start(js, CLUSTER_STATE)
    except (NotFoundError, BadRequestError):
        # The API may start before anything provisioned the bus; provisioning is idempotent.
        await provision(js)
        return await KvFeed.start(js, CLUSTER_STATE)


def _publish(state: ApiState, change: Change | None) -> None:
    if change is not None and state.hub.subscribers:
        state.hub.publish(change.kind, change.event())


class _Replay:
    """Applies one watch's changes, keeping what it has seen until every key's newest value
    came (then the cache drops keys that vanished meanwhile, and clients are told to resync
    after a re-watch)."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self.initial = True
        self.seen: set[str] = set()

    def apply(self, update: Update) -> None:
        state = self.state
        if self.initial:
            self.seen.add(update.key)
        state.watched = max(state.watched, update.revision)
        change = state.cache.apply(
            update.key, update.value, update.revision, update.deleted, replay=self.initial
        )
        _publish(state, change)

    def synced(self) -> None:
        state = self.state
        rewatch = state.cache.ready  # a watch synced before this one: clients must resync
        self.initial = False
        for change in state.cache.forget_missing(self.seen):
            _publish(state, change)
        state.cache.ready = True
        state.synced.set()
        state.watch_error = None
        if rewatch:
            state.hub.publish("resync", sse_event("resync", b'{"reason":"rewatch"}'))


async def _apply_all(state: ApiState, feed: KvFeed) -> None:
    """Apply the feed's changes until it ends, yielding every ``LOOP_SLICE_S`` (or a burst
    would hold every request, and every body half sent, meanwhile) and while a large body goes
    out (api.priority)."""
    replay = _Replay(state)
    await feed.drain(replay.apply, replay.synced, slice_s=LOOP_SLICE_S, priority=state.priority)


async def watch_cluster_state(state: ApiState) -> None:
    """Apply every change of the bucket to the cache, forever; re-watch after any failure.

    A fresh watch replays the newest value of every key, so after a restart the cache is
    reconciled: keys that vanished meanwhile are dropped, and clients are told to resync."""
    while True:
        feed: KvFeed | None = None
        try:
            feed = await _feed(state)
            state.watcher = feed
            await _apply_all(state, feed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            state.watch_restarts += 1
            state.watch_error = f"{type(exc).__name__}: {exc}"
            log.warning("cluster_state watch failed (%s); watching again", state.watch_error)
        finally:
            if feed is not None:  # before the pause: a live feed would go on queueing changes
                await feed.stop()
        await asyncio.sleep(min(5.0, 0.2 * state.watch_restarts))


async def guard_watch_task(state: ApiState) -> None:
    async def restart() -> None:
        if state.watcher is not None:
            await state.watcher.stop()

    await guard_watch(
        state.nc.jetstream(), kv_stream(CLUSTER_STATE), lambda: state.watched, restart, what="api"
    )


async def expire_stale(state: ApiState, interval_s: float = 0.5) -> None:
    """Judge liveness on the API's clock every ``interval_s`` (bus.liveness): during an outage
    nobody rewrites ``online``, and the API must not keep serving it as fresh."""
    while True:
        await asyncio.sleep(interval_s)
        await state.priority.give_way()
        for change in state.cache.expire(time.time(), state.ttl_s):
            _publish(state, change)
