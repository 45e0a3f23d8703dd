"""The loader on tiny checkpoints written here: exact tensors per stage, exact bytes, the data
itself, and every failure with a reason that names the file/tensor/layer and the numbers."""

from __future__ import annotations

import gc
import json
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import save_file

from agents.loader import (
    LoadCancelled,
    LoadError,
    ReadMode,
    StageSpec,
    load_stage,
    stage_bytes,
)
from tests.worker import ckpt

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


def test_selection_matches_the_planners_hf_reader(tmp_path: Path) -> None:
    """The plan's bytes come from planner/hf.py; the loader must pick the very same tensors."""
    hf = pytest.importorskip("planner.hf")
    for tied, shards in ((False, 1), (True, 2)):
        root = tmp_path / f"m-{tied}-{shards}"
        ckpt.write(root, layers=5, shards=shards, tied=tied)
        lay = hf.checkpoint_layout(root)
        specs = [
            StageSpec(0, 5, True, True),
            StageSpec(0, 1, True, False),
            StageSpec(1, 4),
            StageSpec(4, 5, False, True),
        ]
        for spec in specs:
            theirs = hf.tensors_for_stage(
                lay,
                spec.layer_start,
                spec.layer_end,
                embeddings=spec.embeddings,
                head=spec.head,
            )
            shard = load_stage(root, spec, use_cuda=False)
            assert set(shard.names()) == {t.name for t in theirs}, spec
            assert shard.nbytes == sum(t.nbytes for t in theirs), spec


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
    layers_only = exact - data["model.embed_tokens.weight"].nbytes
    load_stage(root, spec, expected_bytes=exact, use_cuda=False)
    load_stage(root, spec, expected_bytes=layers_only, use_cuda=False)  # embeddings flagged apart
    with pytest.raises(
        LoadError, match=rf"byte mismatch: the headers give {exact} bytes.*weight_bytes={exact + 2}"
    ):
        load_stage(root, spec, expected_bytes=exact + 2, use_cuda=False)


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
    with pytest.raises(LoadError, match=r"header corrupt: model\.safetensors header is not JSON"):
        load_stage(root, StageSpec(0, 1), use_cuda=False)
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(
        LoadError, match=r"declares a 1000000000-byte header but the file is 10 bytes"
    ):
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
        match=rf"file truncated: tensor model\.layers\.3\.\S+ in model\.safetensors ends at byte {size} but the file is {size - 100} bytes",
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


def big_checkpoint(root: Path, layers: int = 4, mib_per_layer: int = 48) -> None:
    """A checkpoint with fat layers, written without random data (fast)."""
    root.mkdir(parents=True)
    rows = mib_per_layer * 1024 * 1024 // (1024 * 2)
    data: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.ones((8, 1024), np.float16)}
    for i in range(layers):
        data[f"model.layers.{i}.mlp.up_proj.weight"] = np.full((rows, 1024), i, np.float16)
    data["model.norm.weight"] = np.ones(1024, np.float16)
    data["lm_head.weight"] = np.ones((8, 1024), np.float16)
    save_file(data, str(root / "model.safetensors"))
    (root / "config.json").write_text(
        json.dumps({"num_hidden_layers": layers, "hidden_size": 1024, "vocab_size": 8})
    )


@pytest.mark.parametrize("mode", ["mmap", "pread"])
def test_unload_gives_the_memory_back(tmp_path: Path, mode: ReadMode) -> None:
    root = tmp_path / "big"
    big_checkpoint(root)
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    shard = load_stage(
        root, StageSpec(0, 4, embeddings=True, head=True), use_cuda=False, read_mode=mode
    )
    loaded = proc.memory_info().rss
    assert shard.nbytes > 190 * 2**20
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
