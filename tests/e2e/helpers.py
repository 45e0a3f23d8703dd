"""Shared plumbing for end-to-end tests: the real components on a real NATS server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from aiohttp import web
from nats.aio.client import Client

from shardplane.api.server import make_app, start_app
from shardplane.bus import codec, keys, kvfeed
from shardplane.bus.messages import DeviceState, InstanceState, PlacementReply, Stage
from shardplane.bus.streams import CLUSTER_STATE
from shardplane.commands import run_services
from shardplane.generate import wait_loaded
from tests.kit import eventually, stop_tasks

ROOT = Path(__file__).resolve().parents[2]
DEMO_FLEET = ROOT / "fleets" / "demo.toml"
LONG_TTL_S = 30.0  # liveness TTL for tests that are not about liveness


@contextlib.asynccontextmanager
async def running(
    url: str,
    *,
    fleet: Path | None = DEMO_FLEET,
    api: bool = False,
    api_port: int = 0,
    interval_s: float = 0.5,
    ttl_s: float | None = LONG_TTL_S,
    workers: bool = True,
    controller: bool = True,
) -> AsyncGenerator[asyncio.Event, None]:
    """The components of ``shardplane up`` as tasks. ``ttl_s`` is the projector's liveness TTL:
    long by default, since at 3 x a short ``interval_s`` a stall of a busy machine would mark
    devices offline and the planner would leave them out; pass None for the real default."""
    stop = asyncio.Event()
    tasks = await run_services(
        url,
        stop,
        fleet=fleet,
        api=api,
        api_port=api_port,
        interval_s=interval_s,
        ttl_s=ttl_s,
        workers=workers,
        controller=controller,
    )
    try:
        yield stop
    finally:
        for task in await stop_tasks(stop, tasks, timeout=15):
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc


@contextlib.asynccontextmanager
async def serving_api(
    nc: Client, instance: str, generation: int, token: str
) -> AsyncGenerator[tuple[str, web.Application], None]:
    """The API (with ``token``) in front of ``instance`` once every stage of ``generation`` is
    loaded: (its URL, the app); stopped on the way out."""
    await wait_loaded(nc, instance, generation, 120)
    app = make_app(nc, token=token)
    runner, url = await start_app(app)
    try:
        yield url, app
    finally:
        await runner.cleanup()


async def device_states(nc: Client) -> dict[str, DeviceState]:
    out: dict[str, DeviceState] = {}
    try:
        values = await kvfeed.snapshot(nc.jetstream(), CLUSTER_STATE)
    except Exception:  # no bucket yet
        return out
    for key, update in values.items():
        if keys.prefix(key) == keys.DEVICES:
            state = codec.decode(DeviceState, update.value)
            out[f"{state.sample.node}/{state.sample.index}"] = state
    return out


async def wait_devices(nc: Client, expected: int, timeout: float = 60.0) -> dict[str, DeviceState]:
    def enough(states: dict[str, DeviceState]) -> bool:
        return len(states) >= expected and all(s.online for s in states.values())

    return await eventually(
        lambda: device_states(nc), enough, timeout=timeout, what=f"{expected} devices online"
    )


def settled_in(states: set[str]) -> Callable[[InstanceState], bool]:
    """An instance whose every stage is in one of ``states``."""
    return lambda s: all(st.state in states for st in s.stages)


def assert_valid_plan(reply: PlacementReply, layers: int, devices: dict[str, DeviceState]) -> None:
    """Contiguous [start, end) ranges covering every layer once, each within its device's memory."""
    assert reply.ok, reply.error
    stages: tuple[Stage, ...] = reply.stages
    assert stages, "a plan with no stages"
    assert stages[0].layer_start == 0
    assert stages[-1].layer_end == layers
    for before, after in itertools.pairwise(stages):
        assert before.layer_end == after.layer_start, (before, after)
    for stage in stages:
        assert stage.layer_end > stage.layer_start
        state = devices[stage.device]
        free = state.sample.memory_free_bytes
        assert free is not None
        held = stage.memory_bytes or stage.weight_bytes + stage.kv_bytes
        assert held <= free, f"{stage.device}: stage holds {held} bytes, device has {free} free"
    assert len({s.device for s in stages}) == len(stages), "a device used twice"
