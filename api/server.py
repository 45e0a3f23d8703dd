"""The aiohttp application: routes, middleware and the service entry point ``run_api``.

One background task (``api.watch``) watches the whole ``cluster_state`` bucket and applies every
entry to the cache; the handlers (``api.handlers``) only read the cache (or forward a placement
request over NATS); server-sent events fan each change out to every connected browser through
the hub (``api.hub``); ``/metrics`` is rendered in the background (``api.scrape``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from nats.aio.client import Client

from shardplane.api import metrics, openai_compat
from shardplane.api.auth import JsonErrorRunner, check_binding, env_token, token_middleware
from shardplane.api.errors import ApiError
from shardplane.api.handlers import (
    ERROR_STATUS,
    LARGE_BODY,
    STATIC_DIR,
    device,
    devices,
    events,
    healthz,
    history,
    index,
    metrics_handler,
    nodes,
    openapi_handler,
    place,
    placement,
    placements,
    readyz,
    release,
    topology,
)
from shardplane.api.hub import JSON, STATE_KEY, ApiState, Hub
from shardplane.api.scrape import refresh_metrics
from shardplane.api.state import ClusterCache
from shardplane.api.watch import expire_stale, guard_watch_task, watch_cluster_state
from shardplane.bus.liveness import ttl_from_env

# Named here as well as where they live: callers (tests, docs) know them as api.server's.
__all__ = ["ERROR_STATUS", "LARGE_BODY", "make_app", "run_api", "start_app"]

log = logging.getLogger(__name__)


# --- the application ------------------------------------------------------------------------


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error a client can cause answers JSON naming what was wrong; anything else is a
    500 with the error logged, never a dropped connection or a dead server."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.Response(body=exc.body(), status=exc.status, content_type=JSON)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # A body over the limit is an invalid request (413, code invalid_request), so that every
        # answer to POST /api/placements carries a bus ErrorCode; aiohttp's text names the sizes.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "invalid_request")
        message = exc.text if exc.status == 413 and exc.text else exc.reason
        body = ApiError(exc.status, code, message).body()
        return web.Response(body=body, status=exc.status, content_type=JSON, headers=_allow(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        body = ApiError(500, "internal", f"{type(exc).__name__}: {exc}").body()
        return web.Response(body=body, status=500, content_type=JSON)


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def make_app(
    nc: Client,
    *,
    request_timeout_s: float = 30.0,
    history_points: int = 150,
    metrics_interval_s: float = metrics.RENDER_INTERVAL_S,
    token: str | None = None,
    ttl_s: float | None = None,
) -> web.Application:
    """The whole API on one NATS connection; the watch runs while the app runs. With ``token``,
    mutating endpoints need it as a bearer token (``api.auth``)."""
    app = web.Application(
        middlewares=[errors_middleware, openai_compat.errors_middleware, token_middleware(token)],
        client_max_size=1024 * 1024,
    )
    # A misspelt host label setting stops the API here, before it serves one scrape.
    cache = ClusterCache(history_points, host_label=metrics.host_label_from_env())
    state = ApiState(
        nc=nc,
        cache=cache,
        hub=Hub(),
        request_timeout_s=request_timeout_s,
        ttl_s=ttl_s if ttl_s is not None else ttl_from_env(),
    )
    app[STATE_KEY] = state

    async def watch_ctx(app: web.Application) -> AsyncIterator[None]:
        state.watch_task = asyncio.create_task(watch_cluster_state(state), name="api-watch")
        refresher = asyncio.create_task(
            refresh_metrics(state, metrics_interval_s), name="api-metrics"
        )
        expirer = asyncio.create_task(expire_stale(state), name="api-liveness")
        guard = asyncio.create_task(guard_watch_task(state), name="api-watch-guard")
        # Serve only once the bucket is loaded (or 10 s passed): a first request should see
        # the whole fleet, and /readyz tells the truth either way.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.synced.wait(), 10.0)
        yield
        for task in (state.watch_task, refresher, expirer, guard):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def on_shutdown(app: web.Application) -> None:
        state.hub.close_all()

    app.cleanup_ctx.append(watch_ctx)
    app.on_shutdown.append(on_shutdown)
    r = app.router
    r.add_get("/", index)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_handler)
    r.add_get("/api/openapi.json", openapi_handler)
    r.add_get("/api/gpu/devices", devices)
    r.add_get("/api/gpu/devices/{node}/{index}", device)
    r.add_get("/api/gpu/history", history)
    r.add_get("/api/gpu/topology", topology)
    r.add_get("/api/nodes", nodes)
    r.add_get("/api/placements", placements)
    r.add_post("/api/placements", place)
    r.add_get("/api/placements/{id}", placement)
    r.add_delete("/api/placements/{id}", release)
    r.add_get("/api/events", events)
    r.add_static("/static/", STATIC_DIR, show_index=False)
    openai_compat.register(app, state)  # /v1/models, /v1/completions, /v1/chat/completions
    return app


async def start_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Start ``app`` on ``host:port`` (0 picks a free port); returns the runner and base URL."""
    runner = JsonErrorRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound: Any = runner.addresses[0]
    return runner, f"http://{host}:{int(bound[1])}"


async def run_api(
    nc: Client,
    *,
    stop: asyncio.Event,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
) -> None:
    """Serve until ``stop`` is set, then close clients (SSE streams included) and return.
    ``token`` (default ``SHARDPLANE_API_TOKEN``) guards mutating endpoints; without one, a
    non-loopback ``host`` raises InsecureBinding before anything is served."""
    token = token or env_token()
    check_binding(host, token)
    runner, url = await start_app(make_app(nc, token=token), host, port)
    log.info("status API and dashboard on %s/", url)
    # Whatever is alive now (modules, connections, the loaded cache) lives for the process:
    # moving it out of the cycle collector's generations keeps its full collections, which
    # pause the event loop, down to what changed since. Acyclic garbage (all of the cache's
    # values) is still freed by reference counting as it is replaced.
    gc.freeze()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        gc.unfreeze()  # hand the collector everything back (matters when embedded, as in tests)
