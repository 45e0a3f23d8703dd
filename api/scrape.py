"""The ``/metrics`` rendition: built in the background while something scrapes, so a scrape is
answered from a ready body (plain and gzipped) instead of rendering thousands of series on the
request.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time

from shardplane.api.hub import LOOP_SLICE_S, ApiState, Rendition

log = logging.getLogger(__name__)


def own_metrics(state: ApiState) -> bytes:
    """The API process's own figures (small; rendered with each scrape rendition)."""
    cache = state.cache
    own = [
        "# HELP shardplane_api_sse_clients Server-sent event clients connected.",
        "# TYPE shardplane_api_sse_clients gauge",
        f"shardplane_api_sse_clients {len(state.hub.subscribers)}",
        "# HELP shardplane_api_sse_dropped_total Events dropped for SSE clients too slow to read them.",
        "# TYPE shardplane_api_sse_dropped_total counter",
        f"shardplane_api_sse_dropped_total {state.hub.dropped}",
        "# HELP shardplane_api_kv_updates_total cluster_state changes applied to the cache.",
        "# TYPE shardplane_api_kv_updates_total counter",
        f"shardplane_api_kv_updates_total {cache.updates}",
        "# HELP shardplane_api_kv_invalid_total cluster_state values that failed to decode.",
        "# TYPE shardplane_api_kv_invalid_total counter",
        f"shardplane_api_kv_invalid_total {cache.invalid}",
        "# HELP shardplane_api_kv_revision Newest cluster_state revision the cache holds.",
        "# TYPE shardplane_api_kv_revision gauge",
        f"shardplane_api_kv_revision {cache.revision}",
        "# HELP shardplane_api_watch_restarts_total Times the cluster_state watch was restarted.",
        "# TYPE shardplane_api_watch_restarts_total counter",
        f"shardplane_api_watch_restarts_total {state.watch_restarts}",
        "# HELP shardplane_api_metrics_renders_total Times the scrape text was rendered.",
        "# TYPE shardplane_api_metrics_renders_total counter",
        f"shardplane_api_metrics_renders_total {cache.metrics.renders}",
        "# HELP shardplane_api_placement_requests_total POST /api/placements by outcome.",
        "# TYPE shardplane_api_placement_requests_total counter",
        *(
            f'shardplane_api_placement_requests_total{{outcome="{k}"}} {v}'
            for k, v in sorted(state.placement_requests.items())
        ),
    ]
    return ("\n".join(own) + "\n").encode()


async def render_metrics(state: ApiState) -> Rendition:
    """Render the scrape text and its gzip form once, for every scrape until the next render.

    At 8,000 devices the text is ~40 MB: formatting the changed devices, joining the changed
    families and compressing take tens of milliseconds, so they happen here, at most once per
    ``metrics_interval_s``, in slices that yield to the event loop, the big join and the
    compression in a thread (both release the GIL), never on a scrape's path. A scrape sees
    figures at most ``metrics_interval_s`` plus one render old, well inside any scrape interval
    (the DCGM exporter itself collects every 30 s). Changes that land mid-render are in the next
    one: under constant churn no text is ever "current", and redoing it would only cost more."""
    cache = state.cache
    slice_start = time.perf_counter()
    while cache.format_stale(64):
        if time.perf_counter() - slice_start > LOOP_SLICE_S:
            await asyncio.sleep(0)  # the watch and requests run between slices
            await state.priority.give_way()
            slice_start = time.perf_counter()
    version = cache.metrics.version
    parts: list[bytes] = []
    for part in cache.metrics.parts(cache.summary_metrics):
        parts.append(part)
        await asyncio.sleep(0)
    cache.metrics.renders += 1
    own = own_metrics(state)
    parts.append(own)
    plain, gzipped = await asyncio.to_thread(_join_and_compress, parts)
    rendition = Rendition(
        plain=plain, gzipped=gzipped, own=own, version=version, built=time.monotonic()
    )
    current = state.metrics
    # Two renders can overlap (two first scrapes, a scrape and the refresher): the one that
    # finishes last must not replace newer figures with older ones.
    if current is not None and current.version > version:
        return current
    state.metrics = rendition
    return rendition


def _join_and_compress(parts: list[bytes]) -> tuple[bytes, bytes]:
    plain = b"".join(parts)
    return plain, gzip.compress(plain, 1)


SCRAPED_RECENTLY_S = 300.0  # keep the rendition fresh only while something scrapes


async def refresh_metrics(state: ApiState, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        held = state.metrics
        if held is None or time.monotonic() - state.last_scrape > SCRAPED_RECENTLY_S:
            continue  # nobody scrapes: render on the next scrape, not for nobody
        if state.cache.metrics_dirty(held.version) or own_metrics(state) != held.own:
            try:
                await render_metrics(state)
            except Exception:
                log.exception("rendering /metrics failed")
