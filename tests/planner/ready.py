"""Waiting for planners to serve ``placement.request`` before a test's first request.

A planner answers ``$SRV.PING`` as soon as its micro service exists, which is before its
``placement.request`` endpoint has subscribed; a request in between gets "no responders" at
once. ``$SRV.INFO`` lists an endpoint only once its subscription has been sent, on the same
connection as the INFO reply, so a reply listing it means a request sent after it reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any

import nats
from nats.aio.client import Client

from shardplane.bus import subjects
from shardplane.planner.service import run_planner
from tests.kit import eventually, running

SERVICE = "shardplane-planner"


async def serving_planners(nc: Client, enough: int, collect_s: float = 1.0) -> set[str]:
    """The ids of the planners whose INFO lists ``placement.request``, as answered within
    ``collect_s`` (or as soon as ``enough`` have)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    serving: set[str] = set()
    try:
        await nc.publish(f"$SRV.INFO.{SERVICE}", b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + collect_s
        while len(serving) < enough and (left := deadline - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:  # nats' TimeoutError: nothing more in this round
                break
            if not msg.data:  # the server's "no responders" status: no service yet
                break
            info: dict[str, Any] = json.loads(msg.data)
            endpoints: list[dict[str, Any]] = info.get("endpoints") or []
            served = {e.get("subject") for e in endpoints}
            if {subjects.PLACEMENT_REQUEST, subjects.PLACEMENT_RELEASE} <= served:
                serving.add(str(info.get("id")))
    finally:
        await sub.unsubscribe()
    return serving


async def wait_planners(nc: Client, count: int = 1, timeout: float = 60.0) -> None:
    """Return once ``count`` planners serve ``placement.request``; fail after ``timeout``."""
    await eventually(
        lambda: serving_planners(nc, count),
        lambda seen: len(seen) >= count,
        timeout=timeout,
        what=f"{count} planner(s) serving {subjects.PLACEMENT_REQUEST}",
    )


async def wait_serving(nc: Client, task: asyncio.Task[None], timeout: float = 60.0) -> None:
    """``wait_planners`` for the planner running as ``task``, failing at once with its error if
    it stops first."""
    waiting = asyncio.create_task(wait_planners(nc, timeout=timeout))
    await asyncio.wait((waiting, task), return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():
        waiting.cancel()
        task.result()  # raises what stopped it
        raise AssertionError("the planner returned before serving")
    await waiting


@contextlib.asynccontextmanager
async def planner_running(url: str) -> AsyncGenerator[None, None]:
    """The real planner service on its own connection, as ``shardplane up`` runs it, once its
    endpoints are subscribed (it provisions, starts its watch and registers first)."""
    client = await nats.connect(url)
    try:
        service = running(
            lambda stop: run_planner(client, stop=stop),
            ready=lambda: wait_planners(client),
            ready_timeout=60,
            stop_timeout=30,
        )
        async with service:
            yield
    finally:
        await client.drain()
