"""The test kit every test folder shares: one way to wait, one way to run a service, one set of
message factories.

Why one of each: a wait loop written per test drifts (two clocks, three sleep intervals, some
swallowing every exception, some none), and a factory written per folder drifts from the message
it builds. Here the clock is ``time.monotonic``, the poll interval starts short and backs off to
``POLL_MAX_S`` (a cheap probe answers fast on an idle machine, a costly one does not hammer a
loaded one), and a timeout always says what was awaited and what was last seen."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar, overload

import msgspec
import pytest
from nats.aio.client import Client

from shardplane.bus import codec, keys
from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    InstanceState,
    NodeHeartbeat,
    ShardAssignment,
    ShardStatus,
    Stage,
    StageState,
)
from shardplane.bus.streams import cluster_state

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

ROOT = Path(__file__).resolve().parents[1]
POLL_MIN_S = 0.02
POLL_MAX_S = 0.2
GIB = 2**30


def _passes(value: object) -> bool:
    return value is not False


@overload
async def eventually(
    probe: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool] = ...,
    *,
    timeout: float = ...,
    what: str = ...,
) -> T: ...
@overload
async def eventually(
    probe: Callable[[], T],
    ok: Callable[[T], bool] = ...,
    *,
    timeout: float = ...,
    what: str = ...,
) -> T: ...
async def eventually(
    probe: Callable[[], Any],
    ok: Callable[[Any], bool] = _passes,
    *,
    timeout: float = 15.0,
    what: str = "condition",
) -> Any:
    """Call ``probe`` (sync or async) until ``ok`` holds for what it returns, and return that.
    A probe that raises AssertionError has not passed yet; with no ``ok``, a probe passes when
    it neither raises nor returns False (a check written with asserts returns None). After
    ``timeout`` seconds the last failure is raised, naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    interval = POLL_MIN_S
    while True:
        failure: AssertionError | None = None
        last: object = None
        try:
            got = probe()
            value = await got if inspect.isawaitable(got) else got
            last = value
            if ok(value):
                return value
        except AssertionError as exc:
            failure = exc
        if time.monotonic() > deadline:
            detail = f"{failure}" if failure is not None else f"last: {last!r}"
            raise AssertionError(f"{what} not met in {timeout:g} s; {detail}") from failure
        await asyncio.sleep(interval)
        interval = min(interval * 2, POLL_MAX_S)


def waited(
    probe: Callable[[], T],
    ok: Callable[[T], bool] = _passes,
    *,
    timeout: float = 15.0,
    what: str = "condition",
) -> T:
    """``eventually`` for a test without an event loop (it runs one for the wait): the same
    clock, back-off and failure. Not for a coroutine: there, await ``eventually``."""
    return asyncio.run(eventually(probe, ok, timeout=timeout, what=what))


def until_serving(
    proc: subprocess.Popen[Any], probe: Callable[[], bool], *, timeout: float, what: str
) -> None:
    """``waited`` for ``probe`` while ``proc`` (the process that should make it hold) runs: a
    process that exits first fails the test at once, with its output."""

    def alive_and_ready() -> bool:
        if probe():
            return True
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the process exited ({proc.returncode}) before {what}: {output}")
        return False

    waited(alive_and_ready, bool, timeout=timeout, what=what)


def shardplane(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """``shardplane ARGS`` as a process of this interpreter, run from the repository root, its
    output and errors in one text pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "shardplane.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def shardplane_ran(
    *args: str, env: dict[str, str], timeout: float, **run: Any
) -> subprocess.CompletedProcess[str]:
    """``shardplane ARGS`` run to its end (``timeout`` at most), its output and errors kept
    apart; the caller judges the exit status. ``run`` goes to ``subprocess.run`` (input=...)."""
    return subprocess.run(
        [sys.executable, "-m", "shardplane.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **run,
    )


async def until_logged(
    caplog: pytest.LogCaptureFixture, logger: str, text: str, *, timeout: float = 20.0
) -> logging.LogRecord:
    """The first record of ``logger`` whose message holds ``text``, once logged: a positive
    marker for a negative check (a standby says it stands by; then "only one leads" is a fact,
    not a guess made after a fixed sleep). Set ``caplog``'s level for ``logger`` before the
    code that logs starts, or the record is never captured."""

    def found() -> logging.LogRecord | None:
        records = caplog.records
        return next((r for r in records if r.name == logger and text in r.getMessage()), None)

    record = await eventually(found, lambda r: r is not None, timeout=timeout, what=repr(text))
    assert record is not None
    return record


@contextlib.asynccontextmanager
async def running(
    service: Callable[[asyncio.Event], Coroutine[Any, Any, Any]],
    *,
    ready: Callable[[], Awaitable[object]] | None = None,
    stop_timeout: float = 20.0,
    ready_timeout: float = 20.0,
) -> AsyncGenerator[asyncio.Event, None]:
    """Run ``service(stop)`` as a task until the block ends; yield its stop event (a test may set
    it early to stop the service itself). ``ready``, when given, is awaited before the block
    starts (the service leads, subscribed, ...). On exit the stop is set and the task awaited;
    one that does not return in ``stop_timeout`` is cancelled and the test fails, and an
    exception the service died of is raised here, so no test passes over a crashed service."""
    stop = asyncio.Event()
    task = asyncio.create_task(service(stop))
    try:
        if ready is not None:
            await _ready_or_dead(task, ready(), ready_timeout)
        yield stop
    finally:
        stop.set()
        done, _ = await asyncio.wait([task], timeout=stop_timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise AssertionError(f"service did not stop within {stop_timeout:g} s of its stop")
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc


async def stop_tasks(
    stop: asyncio.Event, tasks: Iterable[asyncio.Task[Any]], timeout: float = 20.0
) -> set[asyncio.Task[Any]]:
    """Set ``stop`` and give ``tasks`` ``timeout`` seconds to return; cancel the ones that do
    not. The tasks that returned (or raised) are returned, for a caller that wants errors."""
    stop.set()
    done, pending = await asyncio.wait(list(tasks), timeout=timeout)
    for task in pending:
        task.cancel()
    return done


async def _ready_or_dead(task: asyncio.Task[Any], ready: Awaitable[object], timeout: float) -> None:
    """Wait for ``ready``, failing at once with the service's own error if it stops first."""
    waiting = asyncio.ensure_future(ready)
    await asyncio.wait((waiting, task), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if waiting.done():
        waiting.result()
        return
    waiting.cancel()
    if task.done():
        task.result()  # raises what stopped it
        raise AssertionError("the service returned before it was ready")
    raise AssertionError(f"the service was not ready in {timeout:g} s")


async def kv_value(nc: Client, kind: type[S], key: str) -> S | None:
    """The ``cluster_state`` value under ``key``, typed; None when it is absent or empty."""
    kv = await cluster_state(nc.jetstream())
    try:
        entry = await kv.get(key)
    except Exception:  # KeyNotFoundError, or the bucket being recreated under a test
        return None
    return codec.decode(kind, entry.value) if entry.value else None


async def wait_instance(
    nc: Client,
    instance: str,
    ok: Callable[[InstanceState], bool],
    *,
    what: str = "settled",
    timeout: float = 60.0,
) -> InstanceState:
    """The instance's KV state once ``ok`` holds for it."""

    async def probe() -> InstanceState | None:
        return await kv_value(nc, InstanceState, keys.instance_key(instance))

    def settled(state: InstanceState | None) -> bool:
        return state is not None and ok(state)

    found = await eventually(probe, settled, timeout=timeout, what=f"instance {instance} {what}")
    assert found is not None
    return found


def api_devices(port: int, timeout: float = 2.0) -> int:
    """How many devices the status API on ``port`` lists; 0 while it does not answer."""
    try:
        url = f"http://127.0.0.1:{port}/api/gpu/devices"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: dict[str, Any] | list[Any] = json.loads(response.read())
    except OSError:
        return 0
    return len(body["devices"] if isinstance(body, dict) else body)


# --- message factories: the fields a test does not care about, filled in one way ------------


def sample(node: str, index: int, seq: int, **fields: Any) -> DeviceSample:
    """A GPU sample: 80 GiB, 70 GiB free, taken now; any field may be given (``free`` is
    short for ``memory_free_bytes``)."""
    base = DeviceSample(
        node=node,
        index=index,
        uuid=f"GPU-{node}-{index}",
        seq=seq,
        ts=time.time(),
        memory_total_bytes=80 * GIB,
        memory_free_bytes=70 * GIB,
    )
    if "free" in fields:
        fields["memory_free_bytes"] = fields.pop("free")
    return msgspec.structs.replace(base, **fields)


def device_state(sample: DeviceSample, **fields: Any) -> DeviceState:
    """``sample``'s device online, last seen when the sample was taken."""
    base = DeviceState(sample=sample, online=True, last_seen=sample.ts)
    return msgspec.structs.replace(base, **fields)


def device_with_free(free: int, total: int = 80 * GIB, ts: float = 1.0) -> DeviceState:
    """Device a/0 online with ``free`` of ``total`` bytes free (the rest used), sampled at
    ``ts``: what the controller's memory lines read."""
    sampled = sample(
        "a", 0, 1, ts=ts, memory_total_bytes=total, memory_used_bytes=total - free, free=free
    )
    return device_state(sampled)


def heartbeat(node: str, seq: int, **fields: Any) -> NodeHeartbeat:
    return msgspec.structs.replace(NodeHeartbeat(node=node, seq=seq, ts=time.time()), **fields)


def assignment(
    instance_id: str, generation: int, node: str, stage: int, count: int, **fields: Any
) -> ShardAssignment:
    """Stage ``stage`` of ``count`` on ``node``'s device 0, ten layers a stage, sent now."""
    base = ShardAssignment(
        instance_id=instance_id,
        generation=generation,
        node=node,
        model="llama-3.1-8b",
        stage=stage,
        stage_count=count,
        device=f"{node}/0",
        layer_start=stage * 10,
        layer_end=stage * 10 + 10,
        ts=time.time(),
    )
    return msgspec.structs.replace(base, **fields)


def status(
    instance_id: str, generation: int, node: str, stage: int, state: str, seq: int, **fields: Any
) -> ShardStatus:
    base = ShardStatus(
        instance_id=instance_id,
        generation=generation,
        node=node,
        stage=stage,
        state=state,  # pyright: ignore[reportArgumentType]
        seq=seq,
        ts=time.time(),
    )
    return msgspec.structs.replace(base, **fields)


def stage(node: str, start: int, end: int, **fields: Any) -> Stage:
    """A plan's stage of layers [start, end) on ``node``'s device 0, its figures all zero (a
    test that reads a figure gives it)."""
    figures = dict.fromkeys(("weight_bytes", "kv_bytes", "bandwidth_gbps", "stage_ms", "hop_ms"), 0)
    base = Stage(
        node=node, device=f"{node}/0", gpu="A100-80GB", layer_start=start, layer_end=end, **figures
    )
    return msgspec.structs.replace(base, **fields)


def instance(instance_id: str, stages: tuple[StageState, ...] = (), **fields: Any) -> InstanceState:
    """Instance ``instance_id`` of model "m", generation 1, as the projector writes it: one
    stage a ``StageState``, loaded unless a field says otherwise."""
    base = InstanceState(
        instance_id=instance_id,
        model="m",
        generation=1,
        stage_count=len(stages),
        state="loaded",
        updated=1.0,
        stages=stages,
    )
    return msgspec.structs.replace(base, **fields)
