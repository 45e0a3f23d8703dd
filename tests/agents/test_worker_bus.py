"""Workers over a real NATS server, fed ShardAssignments on placement.assigned.<node> the way the
planner publishes them, reporting ShardStatus on shard.status.<node>.<instance>."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shardplane.agents import reconcile as rc
from shardplane.agents import worker as worker_mod
from shardplane.agents.loader import CHUNK_BYTES
from shardplane.agents.worker import Worker
from shardplane.bus import codec, subjects
from shardplane.bus.messages import DeviceSample, ShardAssignment
from tests import kit
from tests.agents import ckpt
from tests.agents.busutil import (
    StatusLog,
    assert_interval_kept,
    assign,
    stage,
    until_sample_after,
    workers,
)

LAYERS = 6
NODES = ["n1", "n2", "n3"]
SPLIT = [(0, 2), (2, 3), (3, 6)]  # unequal stages over unequal layers


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    ckpt.write(root, layers=LAYERS, shards=3)
    return root


def plan(
    root: Path, instance: str, generation: int, split: list[tuple[int, int]], nodes: list[str]
) -> list[ShardAssignment]:
    return [
        stage(root, instance, generation, node, i, len(split), a, b, LAYERS)
        for i, ((a, b), node) in enumerate(zip(split, nodes, strict=True))
    ]


def expected_names(a: int, b: int) -> list[str]:
    return ckpt.stage_names(a, b, LAYERS)


async def until_consumer_exists(
    js: JetStreamContext, stream: str, durable: str, timeout: float = 20.0
) -> None:
    async def exists() -> bool:
        try:
            await js.consumer_info(stream, durable)
        except NotFoundError:
            return False
        return True

    await kit.eventually(exists, bool, timeout=timeout, what=f"consumer {durable} on {stream}")


def process_read_bytes() -> int:
    """Bytes this process (all its threads) has read so far, sockets and files alike."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


async def until_read(total: int, timeout: float = 20.0) -> None:
    await kit.eventually(
        process_read_bytes, lambda n: n >= total, timeout=timeout, what=f"{total} bytes read"
    )


@pytest.fixture
async def log(nc: Client) -> AsyncIterator[StatusLog]:
    """Every ShardStatus on the bus from the test's start on; unsubscribed after it."""
    statuses = await StatusLog().start(nc)
    yield statuses
    await statuses.stop()


async def test_every_stage_loads_exactly_its_layers(
    log: StatusLog, nc: Client, js: JetStreamContext, model: Path
) -> None:
    async with workers(nc, NODES) as running:
        stages = plan(model, "tiny", 1, SPLIT, NODES)
        for s in stages:
            await assign(js, s)
        final = await log.settled("tiny", 1, len(SPLIT))
        for s in stages:
            status = final[s.stage]
            assert status.state == "loaded", status
            assert status.bytes_loaded == s.weight_bytes
            assert status.where == "host" and status.tensors == len(
                expected_names(s.layer_start, s.layer_end)
            )
            assert status.load_ms > 0
            assert ckpt.held_names(running[s.node]) == expected_names(s.layer_start, s.layer_end)
        # loading came before loaded, per stage, with rising seq
        for s in stages:
            states = [x.state for x in log.of("tiny", 1) if x.stage == s.stage]
            assert states == ["loading", "loaded"]


async def test_bad_files_fail_with_a_reason_and_nothing_else_suffers(
    log: StatusLog, nc: Client, js: JetStreamContext, model: Path, tmp_path: Path
) -> None:
    # Two more copies of the checkpoint: one loses a shard file, one has a truncated shard.
    missing, truncated = tmp_path / "missing", tmp_path / "truncated"
    shutil.copytree(model, missing)
    shutil.copytree(model, truncated)
    good = plan(model, "good", 1, SPLIT, NODES)
    lost = plan(missing, "lost", 1, SPLIT, NODES)
    cut = plan(truncated, "cut", 1, SPLIT, NODES)
    # The files go bad after planning, as they do in life.
    (missing / "model-00003-of-00003.safetensors").unlink()
    third = truncated / "model-00003-of-00003.safetensors"
    with third.open("r+b") as f:
        f.truncate(third.stat().st_size - 64)
    garbled = plan(model, "garbled", 1, [(0, 6)], ["n1"])
    async with workers(nc, NODES) as running:
        for s in [*good, *lost, *cut]:
            await assign(js, s)
        # A plan whose bytes disagree with the files.
        await assign(js, msgspec.structs.replace(garbled[0], weight_bytes=12345))
        ok = await log.settled("good", 1, 3)
        assert all(s.state == "loaded" for s in ok.values()), ok
        lost_final = await log.settled("lost", 1, 3)
        cut_final = await log.settled("cut", 1, 3)
        bad = await log.settled("garbled", 1, 1)
        assert lost_final[0].state == cut_final[0].state == "loaded"  # stage 0 needs no third file
        assert lost_final[2].state == "failed"
        assert lost_final[2].reason is not None
        assert "file missing: shard file model-00003-of-00003.safetensors" in lost_final[2].reason
        assert cut_final[2].state == "failed"
        assert cut_final[2].reason is not None and "file truncated: tensor" in cut_final[2].reason
        assert "bytes" in cut_final[2].reason
        assert bad[0].state == "failed" and bad[0].reason is not None
        assert "byte mismatch" in bad[0].reason and "weight_bytes=12345" in bad[0].reason
        # The good instance is still exactly where it was on every node.
        for s in good:
            key = rc.ShardKey("good", s.stage)
            assert sorted(running[s.node].tensor_names()[key]) == expected_names(
                s.layer_start, s.layer_end
            )


async def test_new_generation_moves_layers_and_release_unloads(
    log: StatusLog, nc: Client, js: JetStreamContext, model: Path
) -> None:
    async with workers(nc, NODES) as running:
        for s in plan(model, "m", 1, SPLIT, NODES):
            await assign(js, s)
        await log.settled("m", 1, 3)
        # Generation 2: n3 leaves, n1 and n2 take its layers; n3 gets a release.
        gen2 = plan(model, "m", 2, [(0, 4), (4, 6)], ["n1", "n2"])
        for s in gen2:
            await assign(js, s)
        await assign(
            js,
            ShardAssignment(
                instance_id="m",
                generation=2,
                node="n3",
                model=f"hf:{model}",
                release=True,
                stage_count=2,
            ),
        )
        final = await log.settled("m", 2, 2)
        assert [final[i].state for i in (0, 1)] == ["loaded", "loaded"]
        assert [final[i].bytes_loaded for i in (0, 1)] == [s.weight_bytes for s in gen2]
        await log.wait(
            "all generation-1 stages unloaded",
            lambda lg: {s.stage for s in lg.of("m", 1) if s.state == "unloaded"} == {0, 1, 2},
        )
        assert ckpt.held_names(running["n1"]) == expected_names(0, 4)
        assert ckpt.held_names(running["n2"]) == expected_names(4, 6)
        assert ckpt.held_names(running["n3"]) == []
        unload_reasons = {s.reason for s in log.of("m", 1) if s.state == "unloaded"}
        assert unload_reasons == {"replaced by generation 2", "released at generation 2"}


async def test_duplicates_and_stale_generations_are_harmless(
    log: StatusLog, nc: Client, js: JetStreamContext, model: Path
) -> None:
    async with workers(nc, ["n1"]) as running:
        new = stage(model, "d", 2, "n1", 0, 1, 0, LAYERS, LAYERS)
        old = stage(model, "d", 1, "n1", 0, 2, 0, 3, LAYERS)
        for a in (new, new, old, new):
            await assign(js, a)
        await log.settled("d", 2, 1)
        # The marker: one worker applies its assignments in order, so once a later one has
        # loaded, any (wrong) extra work the duplicates or the stale one caused has shown.
        await assign(js, stage(model, "mark", 1, "n1", 0, 1, 0, 1, LAYERS))
        await log.settled("mark", 1, 1)
        assert [s.state for s in log.of("d")] == ["loading", "loaded"]
        held = running["n1"].tensor_names()
        assert set(held) == {rc.ShardKey("d", 0), rc.ShardKey("mark", 0)}, held.keys()
        assert sorted(held[rc.ShardKey("d", 0)]) == expected_names(0, LAYERS)


async def test_assignment_published_while_down_is_applied_on_return(
    log: StatusLog, nc: Client, js: JetStreamContext, model: Path
) -> None:
    async with workers(nc, ["n2"]):
        pass  # n2's durable exists but has never delivered anything
    await assign(js, stage(model, "q", 1, "n2", 0, 1, 0, LAYERS, LAYERS))
    async with workers(nc, ["n2"]):
        assert (await log.settled("q", 1, 1))[0].state == "loaded"
    async with workers(nc, ["n1"]):
        first = stage(model, "r", 1, "n1", 0, 1, 0, LAYERS, LAYERS)
        await assign(js, first)
        await log.settled("r", 1, 1)
    # Down: the worker said it let go, and meanwhile a new plan arrives, plus another instance.
    assert log.of("r", 1)[-1].state == "unloaded"
    moved = stage(model, "r", 2, "n1", 0, 2, 0, 3, LAYERS)
    other = stage(model, "s", 1, "n1", 0, 1, 0, LAYERS, LAYERS)
    await assign(js, moved)
    await assign(js, other)
    async with workers(nc, ["n1"]) as running:
        assert (await log.settled("r", 2, 1))[0].state == "loaded"
        assert (await log.settled("s", 1, 1))[0].state == "loaded"
        assert sorted(running["n1"].tensor_names()) == [rc.ShardKey("r", 0), rc.ShardKey("s", 0)]
        assert running["n1"].tensor_names()[rc.ShardKey("r", 0)] == expected_names(0, 3)
    # Down again with nothing new: on return it reloads what the acked history says it holds.
    before = len(log.of("s", 1))
    async with workers(nc, ["n1"]) as running:
        await log.wait(
            "s reloaded",
            lambda lg: [x.state for x in lg.of("s", 1)[before:]] == ["loading", "loaded"],
        )
        assert sorted(running["n1"].tensor_names()) == [rc.ShardKey("r", 0), rc.ShardKey("s", 0)]


async def test_catalog_model_is_reserved_never_loaded(
    log: StatusLog, nc: Client, js: JetStreamContext
) -> None:
    held: list[tuple[int, int]] = []
    worker = Worker(
        nc,
        node="n1",
        hold_memory=lambda i, d: held.append((i, d)),
        use_cuda=False,
        verify_generations=False,
    )
    async with kit.running(worker.run):
        sizes = {"weight_bytes": 5 * 2**30, "kv_bytes": 2**30, "memory_bytes": 7 * 2**30}
        a = kit.assignment(
            "cat",
            1,
            "n1",
            0,
            1,
            model="llama-3.1-70b",
            device="n1/1",
            layer_end=40,
            ts=0.0,
            **sizes,
        )
        await assign(js, a)
        final = await log.settled("cat", 1, 1, states=("reserved",))
        assert final[0].state == "reserved" and final[0].bytes_loaded == 0 and final[0].tensors == 0
        assert held == [(1, 7 * 2**30)]
        await assign(
            js,
            ShardAssignment(
                instance_id="cat", generation=2, node="n1", model="llama-3.1-70b", release=True
            ),
        )
        await log.wait("released", lambda lg: lg.of("cat", 1)[-1].state == "unloaded")
        assert held == [(1, 7 * 2**30), (1, -7 * 2**30)]
        assert worker.tensor_names() == {}


async def test_telemetry_keeps_flowing_while_a_shard_loads(
    log: StatusLog, nc: Client, js: JetStreamContext, tmp_path: Path
) -> None:
    """A load runs in a thread: samples published on the same event loop keep their interval."""
    root = tmp_path / "wide"
    ckpt.write(root, layers=4, hidden=256, vocab=512, intermediate=1024, grow=256)
    interval = 0.05
    samples: list[DeviceSample] = []

    async def on_sample(msg: Msg) -> None:
        samples.append(codec.decode(DeviceSample, msg.data))

    sub = await nc.subscribe(subjects.gpu_sample("n1", 0), cb=on_sample)
    stop = asyncio.Event()

    async def telemetry() -> None:  # stands in for the collector on the agent's loop
        seq = 0
        while not stop.is_set():
            seq += 1
            sample = DeviceSample(node="n1", index=0, uuid="GPU-sim", seq=seq, ts=time.time())
            await nc.publish(subjects.gpu_sample("n1", 0), codec.encode(sample))
            await asyncio.sleep(interval)

    a = stage(root, "slow", 1, "n1", 0, 1, 0, 4, 4)
    # Throttled so the load lasts ~1.5 s: long enough that a blocked loop would show.
    worker = Worker(
        nc, node="n1", use_cuda=False, read_limit_bps=a.weight_bytes / 1.5, verify_generations=False
    )
    tasks = [asyncio.create_task(telemetry()), asyncio.create_task(worker.run(stop))]
    try:
        await assign(js, a)
        final = await log.settled("slow", 1, 1)
        assert final[0].state == "loaded" and final[0].load_ms > 1000
        # The load's own window, in wall-clock time, from the status the worker published.
        ended = final[0].ts
        started = ended - final[0].load_ms / 1000.0
        # Every sample taken during the load has reached us once one taken after it has.
        await until_sample_after(samples, ended)
        assert_interval_kept(samples, started, ended, interval)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await sub.unsubscribe()


async def test_worker_survives_its_durable_being_deleted(
    log: StatusLog, nc: Client, js: JetStreamContext, model: Path
) -> None:
    async with workers(nc, ["n1"]):
        await until_consumer_exists(js, "PLACEMENTS", "worker-n1")
        await js.delete_consumer("PLACEMENTS", "worker-n1")
        await asyncio.sleep(0.5)
        await assign(js, stage(model, "z", 1, "n1", 0, 1, 0, LAYERS, LAYERS))
        assert (await log.settled("z", 1, 1, timeout=15.0))[0].state == "loaded"


async def test_idle_polls_are_quiet_and_real_fetch_errors_say_what(
    log: StatusLog,
    nc: Client,
    js: JetStreamContext,
    model: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An empty long poll is the worker's normal idle state: debug, never a warning. A fetch that
    really fails (its durable deleted under it) is a warning that names the error."""
    monkeypatch.setattr(worker_mod, "FETCH_TIMEOUT_S", 0.2)
    caplog.set_level(logging.DEBUG, logger="shardplane.agents.worker")
    async with workers(nc, ["n1"]):

        def idle() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "shardplane.agents.worker"]

        def empty_polls() -> int:
            return sum("no assignment within 0.2 s" in r.getMessage() for r in idle())

        # Several empty polls (counted, not slept for: a busy machine starts the worker late).
        await kit.eventually(empty_polls, lambda n: n >= 3, timeout=15, what="3 empty polls")
        assert [r.getMessage() for r in idle() if r.levelno >= logging.WARNING] == []
        await js.delete_consumer("PLACEMENTS", "worker-n1")
        await assign(js, stage(model, "w", 1, "n1", 0, 1, 0, LAYERS, LAYERS))
        assert (await log.settled("w", 1, 1, timeout=15.0))[0].state == "loaded"
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.name == "shardplane.agents.worker" and r.levelno == logging.WARNING
    ]
    assert warned, "the deleted durable went unreported"
    assert all(
        re.fullmatch(
            r"worker n1: fetching assignments from PLACEMENTS failed \(\w+(: .+)?\), attempt \d+; "
            r"retrying in \d+\.\d s",
            m,
        )
        for m in warned
    ), warned


async def test_a_file_cut_short_while_loading_fails_the_stage_not_the_worker(
    log: StatusLog, nc: Client, js: JetStreamContext, model: Path, tmp_path: Path
) -> None:
    """The checkpoint shrinks while the worker reads it (after the header and size checks):
    the stage ends ``failed`` with the reason, and the same worker goes on to load the next
    assignment. With a memory-mapped read this would be SIGBUS and the agent gone."""
    big = tmp_path / "big"
    ckpt.write_big(big)
    a = stage(big, "cut", 1, "n1", 0, 1, 0, 4, 4)
    # Throttled to last ~8 s: after its first chunk the copy sleeps ~2.7 s before reading the
    # next, and the file is cut in that pause (after the size check, before the read that must
    # come up short), however late the load thread got going.
    async with workers(nc, ["n1"], read_limit_bps=a.weight_bytes / 8.0) as running:
        assert running["n1"].read_mode == "pread"  # the default
        read_before = process_read_bytes()
        await assign(js, a)
        await log.wait("loading", lambda log: any(s.state == "loading" for s in log.of("cut")))
        await until_read(read_before + CHUNK_BYTES)  # the first chunk is in: the copy is under way
        with (big / "model.safetensors").open("r+b") as f:
            f.truncate(10 * 2**20)
        final = (await log.settled("cut", 1, 1))[0]
        assert final.state == "failed", final
        # "while loading": a read came up short, not the size check before the copy.
        assert final.reason is not None, final
        assert final.reason.startswith("file truncated while loading"), final
        assert str(big / "model.safetensors") in final.reason
        assert running["n1"].tensor_names() == {}
        await assign(js, stage(model, "next", 1, "n1", 0, 1, 0, LAYERS, LAYERS))
        assert (await log.settled("next", 1, 1))[0].state == "loaded"
