"""The loader on tiny checkpoints written here: exact tensors per stage, exact bytes, the data
itself, and every failure with a reason that names the file/tensor/layer and the numbers."""

from __future__ import annotations

import gc
import json
import re
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import save_file  # pyright: ignore[reportUnknownVariableType]

from shardplane.agents.loader import (
    DEFAULT_READ_MODE,
    Checkpoint,
    LoadCancelled,
    LoadError,
    ReadMode,
    StageSpec,
    load_stage,
    stage_bytes,
)
from shardplane.planner import validate
from shardplane.planner.catalog import resolve
from shardplane.planner.cost import Problem, evaluate, stages_from_counts
from shardplane.planner.fleet import Device, Fleet
from shardplane.planner.plan import to_stages
from tests.agents import ckpt

SPLITS = [
    StageSpec(0, 2, embeddings=True),
    StageSpec(2, 3),
    StageSpec(3, 6, head=True),
]


@pytest.fixture(params=[1, 3], ids=["single", "sharded"])
def model(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "tiny"
    data = ckpt.write(root, layers=6, shards=int(request.param))
    return root, data


def expected_names(spec: StageSpec, *, tied: bool = False) -> set[str]:
    names = ckpt.layer_names(spec.layer_start, spec.layer_end)
    if spec.embeddings:
        names.add("model.embed_tokens.weight")
    if spec.head:
        names.add("model.norm.weight")
        names.add("model.embed_tokens.weight" if tied else "lm_head.weight")
    return names


@pytest.mark.parametrize("mode", ["mmap", "pread"])
def test_each_stage_holds_exactly_its_tensors_and_bytes(
    model: tuple[Path, dict[str, np.ndarray]], mode: ReadMode
) -> None:
    root, data = model
    total = 0
    for spec in SPLITS:
        shard = load_stage(
            root, spec, expected_bytes=stage_bytes(root, spec), use_cuda=False, read_mode=mode
        )
        assert set(shard.names()) == expected_names(spec)
        assert shard.nbytes == sum(data[n].nbytes for n in expected_names(spec))
        assert shard.where == "host"
        for name, array in shard.tensors.items():
            assert array.shape == data[name].shape, name
            assert np.array_equal(array.view(data[name].dtype), data[name]), name
        total += shard.nbytes
        shard.release()
    assert total == sum(a.nbytes for a in data.values())  # stages partition the checkpoint


def test_layers_are_of_unequal_size(model: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = model
    sizes = [stage_bytes(root, StageSpec(i, i + 1)) for i in range(6)]
    assert len(set(sizes)) == 6


def _devices(n: int) -> tuple[Device, ...]:
    return tuple(Device(f"n{i}/0", f"n{i}", 0, "g", 100.0, 2**40, 2**40) for i in range(n))


@pytest.mark.parametrize(("tied", "shards"), [(False, 1), (True, 2), (False, 3), (True, 1)])
def test_planned_weight_bytes_are_the_loaded_bytes_of_every_stage(
    tmp_path: Path, tied: bool, shards: int
) -> None:
    """The plan's weight_bytes (planner: headers -> profile -> cost model) is, for every stage,
    first and last included, exactly the bytes the loader reads; the loader accepts nothing else.
    Splits cover one stage holding everything (a tied matrix once) up to one layer per stage."""
    root = tmp_path / "m"
    ckpt.write(root, layers=5, shards=shards, tied=tied)
    profile = resolve(f"hf:{root}")
    for counts in ([5], [1, 4], [4, 1], [2, 2, 1], [1, 1, 1, 1, 1]):
        devices = _devices(len(counts))
        problem = Problem(profile, Fleet(devices=devices), context_tokens=16, batch=1)
        ev = evaluate(problem, stages_from_counts(devices, counts))
        stages = to_stages(problem, ev)
        validate.check(problem, stages, ev.bottleneck_ms, ev.latency_ms)
        for s in stages:
            spec = StageSpec(s.layer_start, s.layer_end, s.embeddings, s.head)
            shard = load_stage(root, spec, expected_bytes=s.weight_bytes, use_cuda=False)
            assert shard.nbytes == s.weight_bytes == stage_bytes(root, spec), (counts, s)
            assert set(shard.names()) == expected_names(spec, tied=tied)
            shard.release()


def test_tied_embeddings(tmp_path: Path) -> None:
    root = tmp_path / "tied"
    data = ckpt.write(root, layers=4, tied=True)
    last = load_stage(root, StageSpec(2, 4, head=True), use_cuda=False)
    assert set(last.names()) == expected_names(StageSpec(2, 4, head=True), tied=True)
    assert np.array_equal(
        last.tensors["model.embed_tokens.weight"].view(np.float16),
        data["model.embed_tokens.weight"],
    )
    whole = load_stage(root, StageSpec(0, 4, embeddings=True, head=True), use_cuda=False)
    # One stage holding both ends keeps the shared matrix once.
    assert whole.nbytes == sum(a.nbytes for a in data.values())


def test_plan_bytes_must_match_exactly(tmp_path: Path) -> None:
    root = tmp_path / "m"
    data = ckpt.write(root, layers=4)
    spec = StageSpec(0, 2, embeddings=True)
    exact = stage_bytes(root, spec)
    embed = data["model.embed_tokens.weight"].nbytes
    load_stage(root, spec, expected_bytes=exact, use_cuda=False)
    # One rule: a plan that counted only the layers (the embeddings left out) is refused too.
    for wrong in (exact - embed, exact + 2):
        with pytest.raises(
            LoadError,
            match=rf"byte mismatch: the headers give {exact} bytes for layers \[0, 2\) \+ "
            rf"embeddings \({exact - embed} in layers, {embed} in embeddings/norm/head, 19 "
            rf"tensors\) but the plan says weight_bytes={wrong} \({re.escape(f'{wrong - exact:+d}')}\)",
        ):
            load_stage(root, spec, expected_bytes=wrong, use_cuda=False)


def test_missing_tensor_names_layer_and_file(tmp_path: Path) -> None:
    root = tmp_path / "m"
    data = ckpt.write(root, layers=4)
    del data["model.layers.3.mlp.up_proj.weight"]
    save_file(data, str(root / "model.safetensors"))
    load_stage(root, StageSpec(0, 3), use_cuda=False)  # other layers are fine
    with pytest.raises(
        LoadError,
        match=r"tensor missing for layer 3: model\.layers\.3\.mlp\.up_proj\.weight \(layer 3 has 8 of 9",
    ):
        load_stage(root, StageSpec(2, 4, head=True), use_cuda=False)


def test_index_lists_a_tensor_the_shard_lacks(tmp_path: Path) -> None:
    root = tmp_path / "m"
    data = ckpt.write(root, layers=4, shards=2)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    file = index["weight_map"]["model.layers.3.mlp.up_proj.weight"]
    part = {n: data[n] for n, f in index["weight_map"].items() if f == file}
    del part["model.layers.3.mlp.up_proj.weight"]
    save_file(part, str(root / file))
    with pytest.raises(
        LoadError, match=rf"tensor model\.layers\.3\.mlp\.up_proj\.weight missing from {file}"
    ):
        load_stage(root, StageSpec(3, 4), use_cuda=False)


def test_missing_shard_file_fails_only_stages_that_need_it(tmp_path: Path) -> None:
    root = tmp_path / "m"
    ckpt.write(root, layers=6, shards=3)
    (root / "model-00003-of-00003.safetensors").unlink()
    load_stage(root, StageSpec(0, 2, embeddings=True), use_cuda=False)
    with pytest.raises(
        LoadError, match=r"file missing: shard file model-00003-of-00003\.safetensors"
    ):
        load_stage(root, StageSpec(3, 6, head=True), use_cuda=False)


def test_corrupt_header(tmp_path: Path) -> None:
    root = tmp_path / "m"
    ckpt.write(root, layers=3)
    path = root / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\xff\xfe{]"
    path.write_bytes(bytes(raw))
    with pytest.raises(LoadError, match=rf"header corrupt: {path} header is not JSON"):
        load_stage(root, StageSpec(0, 1), use_cuda=False)
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(LoadError, match=r"declares a 1000000-byte header but the file is 10 bytes"):
        load_stage(root, StageSpec(0, 1), use_cuda=False)


def test_truncated_file_fails_the_stage_whose_bytes_are_gone(tmp_path: Path) -> None:
    root = tmp_path / "m"
    ckpt.write(root, layers=4)
    path = root / "model.safetensors"
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size - 100)  # cuts into the last tensor in file order, one of layer 3's
    load_stage(root, StageSpec(0, 2, embeddings=True), use_cuda=False)
    with pytest.raises(
        LoadError,
        match=rf"file truncated: tensor model\.layers\.3\.\S+ in {path} ends at byte {size} "
        rf"but the file is {size - 100} bytes",
    ):
        load_stage(root, StageSpec(2, 4, head=True), use_cuda=False)


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="file missing: checkpoint directory"):
        load_stage(tmp_path / "nope", StageSpec(0, 1), use_cuda=False)
    root = tmp_path / "m"
    ckpt.write(root, layers=2)
    with pytest.raises(LoadError, match=r"outside the checkpoint's 2 layers"):
        load_stage(root, StageSpec(1, 3), use_cuda=False)
    (root / "config.json").unlink()
    with pytest.raises(LoadError, match=r"file missing: .*config\.json"):
        load_stage(root, StageSpec(0, 1), use_cuda=False)


def test_out_of_memory_says_the_numbers(tmp_path: Path) -> None:
    root = tmp_path / "m"
    ckpt.write(root, layers=2)
    need = stage_bytes(root, StageSpec(0, 2))
    with pytest.raises(
        LoadError,
        match=rf"out of memory on host: layers \[0, 2\) needs {need} bytes .* only 1000 bytes",
    ):
        load_stage(root, StageSpec(0, 2), use_cuda=False, memory_limit=1000)


def test_cancel_stops_a_load(tmp_path: Path) -> None:
    root = tmp_path / "m"
    ckpt.write(root, layers=2)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LoadCancelled):
        load_stage(root, StageSpec(0, 2), use_cuda=False, cancel=cancel)


@pytest.mark.parametrize("mode", ["mmap", "pread"])
def test_unload_gives_the_memory_back(tmp_path: Path, mode: ReadMode) -> None:
    root = tmp_path / "big"
    ckpt.write_big(root)
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    shard = load_stage(
        root, StageSpec(0, 4, embeddings=True, head=True), use_cuda=False, read_mode=mode
    )
    loaded = proc.memory_info().rss
    assert shard.nbytes > 190 * 2**20
    layer = None
    for i in range(4):  # big runs go through the multi-threaded copy: check every byte landed
        layer = shard.tensors[f"model.layers.{i}.mlp.up_proj.weight"].view(np.float16)
        assert layer.shape == (24 * 1024, 1024)
        assert np.all(layer == i), i
    del layer  # a view keeps the whole stage buffer alive
    # The mapping's page-cache pages are not ours; the copy is, so RSS grows by about its size.
    assert loaded - before > 0.8 * shard.nbytes, (before, loaded)
    shard.release()
    del shard
    gc.collect()
    after = proc.memory_info().rss
    assert after - before < 0.2 * (loaded - before), (before, loaded, after)


def test_a_file_cut_short_during_the_load_fails_it_with_a_reason(tmp_path: Path) -> None:
    """The file shrinks after its header was read and its size checked, in the middle of the
    copy. With the default read mode that is a short read: a LoadError naming the file, the
    offset and the tensor, and the process carries on. (A memory map would raise SIGBUS there
    and kill the whole agent, which is why pread is the default.)"""
    assert DEFAULT_READ_MODE == "pread"
    root = tmp_path / "big"
    ckpt.write_big(root)  # one file, one run of ~192 MiB: read in 64 MiB chunks when throttled
    path = root / "model.safetensors"
    refs = Checkpoint.open(root).refs(StageSpec(0, 4, embeddings=True, head=True))
    cut = min(r.begin for r in refs) + 100 * 2**20  # inside the second chunk
    inside = next(r for r in refs if r.begin <= cut < r.end)
    seen: list[int] = []

    def truncate_after_first_chunk(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 1:
            with path.open("r+b") as f:
                f.truncate(cut)

    with pytest.raises(
        LoadError,
        match=rf"file truncated while loading: {path} is now {cut} bytes but the stage's tensors "
        rf"in it run to byte {max(r.end for r in refs)}; the read at byte {cut} \(tensor "
        rf"{re.escape(inside.name)}, bytes \[{inside.begin}, {inside.end}\)\) came up short",
    ):
        load_stage(
            root,
            StageSpec(0, 4, embeddings=True, head=True),
            use_cuda=False,
            read_limit_bps=1e15,  # throttled path: chunk by chunk, progress after each
            on_progress=truncate_after_first_chunk,
        )
    assert seen == [64 * 2**20]  # it failed in the chunk after the cut, not at the end
