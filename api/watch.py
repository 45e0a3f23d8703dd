"""The one background task that watches the whole ``cluster_state`` bucket into the cache.

Handlers only read the cache; this is the only writer. It yields to requests every
``LOOP_SLICE_S`` (thousands of changes a second would otherwise hold the loop) and waits while a
large body is sent (api.priority), restarts a watch that stalls, and marks entries stale that
the projector stopped refreshing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from nats.js.errors import BadRequestError, NotFoundError

from shardplane.api.hub import LOOP_SLICE_S, ApiState
from shardplane.api.state import Change, sse_event
from shardplane.bus.streams import CLUSTER_STATE, kv_stream, provision
from shardplane.bus.watchguard import guard_watch

log = logging.getLogger(__name__)

# --- the watch ------------------------------------------------------------------------------


async def _bucket(state: ApiState) -> Any:
    js = state.nc.jetstream()
    try:
        return await js.key_value(CLUSTER_STATE)
    except (NotFoundError, BadRequestError):
        # The API may start before anything provisioned the bus; provisioning is idempotent.
        await provision(js)
        return await js.key_value(CLUSTER_STATE)


def _publish(state: ApiState, change: Change | None) -> None:
    if change is not None and state.hub.subscribers:
        state.hub.publish(change.kind, change.event())


async def watch_cluster_state(state: ApiState) -> None:
    """Apply every change of the bucket to the cache, forever; re-watch after any failure.

    A fresh watch replays the newest value of every key, so after a restart the cache is
    reconciled: keys that vanished meanwhile are dropped, and clients are told to resync."""
    first = True
    while True:
        watcher: Any = None
        try:
            kv = await _bucket(state)
            watcher = await kv.watchall()
            state.watcher = watcher
            seen: set[str] = set()
            initial = True
            slice_start = time.perf_counter()
            async for entry in watcher:
                if state.priority.should_wait():
                    await state.priority.give_way()  # a large body is going out (api.priority)
                    slice_start = time.perf_counter()
                if entry is None:
                    if initial:
                        initial = False
                        for change in state.cache.forget_missing(seen):
                            _publish(state, change)
                        state.cache.ready = True
                        state.synced.set()
                        state.watch_error = None
                        if not first:
                            state.hub.publish(
                                "resync", sse_event("resync", b'{"reason":"rewatch"}')
                            )
                        first = False
                    continue
                key = str(entry.key)
                if initial:
                    seen.add(key)
                deleted = entry.operation in ("DEL", "PURGE")
                revision = int(entry.revision or 0)
                state.watched = max(state.watched, revision)
                change = state.cache.apply(key, entry.value, revision, deleted, replay=initial)
                _publish(state, change)
                if time.perf_counter() - slice_start > LOOP_SLICE_S:
                    # A queued entry is taken without suspending: yield now and then, or a burst
                    # of changes would hold every request (and every body half sent) meanwhile.
                    await asyncio.sleep(0)
                    slice_start = time.perf_counter()
            raise ConnectionError("the watch ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            state.watch_restarts += 1
            state.watch_error = f"{type(exc).__name__}: {exc}"
            log.warning("cluster_state watch failed (%s); watching again", state.watch_error)
            await asyncio.sleep(min(5.0, 0.2 * state.watch_restarts))
        finally:
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()


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
