"""The projector's shortcuts into nats-py are on, on the nats-py it was written for.

Each shortcut (projector/wire.py) falls back to nats-py's public API at run time when the
internals it needs are missing, so an upgrade would silently cost the projector its throughput;
or, where the internals are there but changed, misparse (test_wire.py checks every frame byte
for byte). pyproject pins nats-py to the one minor release these were written against; these
tests fail when the installed one is outside it or when a shortcut is not in use.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.bus import codec, subjects
from shardplane.bus.direct import is_direct
from shardplane.projector.wire import fast_path_state, subscribe_direct
from tests.kit import eventually
from tests.projector.helpers import FAST, device, projector, sample

ROOT = Path(__file__).resolve().parents[2]


def nats_py_pin() -> tuple[int, int]:
    """(major, minor) of the ``nats-py>=X.Y,<X.Y+1`` pin in pyproject."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("nats-py")]
    m = re.fullmatch(r"nats-py>=(\d+)\.(\d+)(?:\.\d+)?,<(\d+)\.(\d+)", spec.replace(" ", ""))
    assert m, f"{spec!r}: pin nats-py to one minor release (>=X.Y,<X.Y+1)"
    low, high = (int(m[1]), int(m[2])), (int(m[3]), int(m[4]))
    assert high == (low[0], low[1] + 1), f"{spec!r} spans more than one minor release"
    return low


def test_installed_nats_py_is_the_pinned_minor() -> None:
    major, minor = nats_py_pin()
    installed = version("nats-py")
    assert installed.split(".")[:2] == [str(major), str(minor)], (
        f"nats-py {installed} is installed; projector/wire.py was written against "
        f"{major}.{minor}: check its shortcuts against the new version, then move the pin"
    )


async def test_a_direct_subscription_takes_the_fast_path(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        got: list[bytes] = []
        sub = await subscribe_direct(nc, "fast.path", lambda msg: got.append(msg.data))
        assert is_direct(sub), "the subscription fell back to nats-py's queue"
        state = fast_path_state(nc)
        assert state.parser, "nats-py's parser is not the one FastParser extends"
        assert state.framing, "nats-py lacks the internals framed publishes go through"
        for i in range(20):
            await nc.publish("fast.path", b"%d" % i)
        await nc.publish("fast.path", b"h", headers={"A": "1"})  # nats-py's own path
        await eventually(lambda: _len(got), lambda n: n == 21)
        assert got == [b"%d" % i for i in range(20)] + [b"h"]
        assert fast_path_state(nc).fast_frames == 20  # every plain frame, and only those
    finally:
        await nc.close()


async def _len(items: list[bytes]) -> int:
    return len(items)


async def test_the_projector_runs_on_the_fast_path(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    async with projector(nats_url) as runner:
        for seq in range(5):
            await js.publish(subjects.gpu_sample("rig-a", 0), codec.encode(sample("rig-a", 0, seq)))
        await eventually(
            lambda: device(nc, "rig-a", 0), lambda s: s is not None and s.sample.seq == 4
        )
        state = fast_path_state(runner.nc)
        direct = [s for s in runner.nc._subs.values() if is_direct(s)]  # pyright: ignore[reportPrivateUsage]
    assert state.framing and state.parser
    # Its pull deliveries and its KV writes' PubAcks: both direct subscriptions, and the five
    # samples plus at least one PubAck came through the FastParser.
    assert len(direct) >= 2, direct
    assert state.fast_frames >= 6, state


async def test_the_check_sees_a_projector_off_the_fast_path(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    """What a silent fallback looks like (here chosen by config): the checks above would fail."""
    slow = dataclasses.replace(FAST, direct_delivery=False)
    async with projector(nats_url, slow) as runner:
        await js.publish(subjects.gpu_sample("rig-a", 0), codec.encode(sample("rig-a", 0, 1)))
        await eventually(lambda: device(nc, "rig-a", 0), lambda s: s is not None)
        state = fast_path_state(runner.nc)
        direct = [s for s in runner.nc._subs.values() if is_direct(s)]  # pyright: ignore[reportPrivateUsage]
    assert (state.parser, state.fast_frames, direct) == (False, 0, [])
