"""hf:<dir> — exact per-layer bytes from safetensors headers, on tiny checkpoints built here."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file  # pyright: ignore[reportUnknownVariableType]

from shardplane.bus import checkpoint as hf_format
from shardplane.planner import hf
from shardplane.planner.catalog import resolve
from shardplane.planner.cost import Problem
from shardplane.planner.plan import plan
from tests.planner.fleetkit import DEMO, fleet_of

HIDDEN = 16
VOCAB = 50


def _layer(i: int, inter: int, dtype: type[np.generic] = np.float16) -> dict[str, np.ndarray]:
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": np.zeros((HIDDEN, HIDDEN), dtype),
        p + "self_attn.k_proj.weight": np.zeros((8, HIDDEN), dtype),
        p + "self_attn.v_proj.weight": np.zeros((8, HIDDEN), dtype),
        p + "self_attn.o_proj.weight": np.zeros((HIDDEN, HIDDEN), dtype),
        p + "mlp.gate_proj.weight": np.zeros((inter, HIDDEN), dtype),
        p + "mlp.up_proj.weight": np.zeros((inter, HIDDEN), dtype),
        p + "mlp.down_proj.weight": np.zeros((HIDDEN, inter), dtype),
        p + "input_layernorm.weight": np.zeros((HIDDEN,), np.float32),
        p + "post_attention_layernorm.weight": np.zeros((HIDDEN,), np.float32),
    }


def _config(layers: int, *, tied: bool = False, new_style: bool = True) -> dict[str, object]:
    cfg: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layers,
        "hidden_size": HIDDEN,
        "intermediate_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "tie_word_embeddings": tied,
    }
    if new_style:
        cfg |= {
            "dtype": "bfloat16",
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        }
    else:
        cfg |= {"torch_dtype": "float16", "rope_theta": 10000.0}
    return cfg


# Layers of unequal size: layer 2's MLP is four times wider.
INTER = [32, 32, 128, 32]


def _tensors(tied: bool) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np.zeros((VOCAB, HIDDEN), np.float16),
        "model.norm.weight": np.zeros((HIDDEN,), np.float32),
    }
    for i, inter in enumerate(INTER):
        t |= _layer(i, inter)
    if not tied:
        t["lm_head.weight"] = np.zeros((VOCAB, HIDDEN), np.float16)
    return t


def _expected_layer_bytes() -> list[int]:
    return [sum(a.nbytes for a in _layer(i, inter).values()) for i, inter in enumerate(INTER)]


def _single(tmp_path: Path, *, tied: bool = False, new_style: bool = True) -> Path:
    (tmp_path / "config.json").write_text(
        json.dumps(_config(len(INTER), tied=tied, new_style=new_style))
    )
    save_file(_tensors(tied), str(tmp_path / hf.SINGLE_FILE))
    return tmp_path


def _sharded(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(_config(len(INTER), new_style=False)))
    tensors = _tensors(False)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map: dict[str, str] = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
        weight_map |= dict.fromkeys(keys, fname)
    (tmp_path / hf.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


@pytest.mark.parametrize("new_style", [True, False])
def test_single_file_exact_layer_bytes(tmp_path: Path, new_style: bool) -> None:
    d = _single(tmp_path, new_style=new_style)
    prof = hf.load_profile(d)
    assert list(prof.layer_bytes) == _expected_layer_bytes()
    assert prof.layer_bytes[2] > prof.layer_bytes[0]  # unequal layers are kept unequal
    assert prof.embed_bytes == VOCAB * HIDDEN * 2
    assert prof.head_bytes == VOCAB * HIDDEN * 2 + HIDDEN * 4  # lm_head + final norm
    assert prof.kv_bytes_per_token == (2 * 2 * 4 * 2,) * 4  # 2 KV heads x head_dim 4, fp16
    config = hf.read_config(d)
    assert hf.rope_theta(config) == (500000.0 if new_style else 10000.0)
    assert hf.dtype_bytes(config) == 2.0


def test_sharded_index_matches_single_file(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a = hf.load_profile(_single(a_dir))
    b = hf.load_profile(_sharded(b_dir))
    assert a.layer_bytes == b.layer_bytes and a.head_bytes == b.head_bytes
    files = {t.file for t in hf.checkpoint_tensors(b_dir).values()}
    assert files == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_tied_embeddings_use_the_embedding_as_head(tmp_path: Path) -> None:
    d = _single(tmp_path, tied=True)
    lay = hf.checkpoint_layout(d)
    assert lay.head_tied and lay.head == lay.embeddings
    prof = hf.load_profile(d)
    matrix, norm = VOCAB * HIDDEN * 2, HIDDEN * 4
    assert (prof.embed_bytes, prof.head_bytes, prof.tied_bytes) == (matrix, matrix + norm, matrix)
    # The last stage holds the matrix as its head; a single stage holds it once.
    assert prof.end_bytes(False, True) == matrix + norm
    assert prof.end_bytes(True, True) == matrix + norm
    assert prof.weight_bytes == sum(_expected_layer_bytes()) + matrix + norm


def test_tensor_offsets_point_at_the_bytes(tmp_path: Path) -> None:
    d = _single(tmp_path)
    tensors = hf.checkpoint_tensors(d)
    t = tensors["model.layers.2.mlp.up_proj.weight"]
    assert t.shape == (128, HIDDEN) and t.dtype == "F16" and t.nbytes == 128 * HIDDEN * 2
    expected = _tensors(False)["model.layers.2.mlp.up_proj.weight"]
    expected[:] = 3  # a value the zeros around it do not have
    save_file({**_tensors(False), "model.layers.2.mlp.up_proj.weight": expected}, str(d / t.file))
    with (d / t.file).open("rb") as f:
        f.seek(t.begin)
        assert np.frombuffer(f.read(t.nbytes), np.float16).tolist() == expected.ravel().tolist()


def test_reads_headers_only(tmp_path: Path) -> None:
    """A 64 GiB (sparse) data region: reading any of it would take far longer than the test."""
    header_json = json.dumps(
        {"model.layers.0.w": {"dtype": "BF16", "shape": [2**35 // 2], "data_offsets": [0, 2**35]}}
    ).encode()
    path = tmp_path / "model.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header_json)) + header_json)
        f.truncate(8 + len(header_json) + 2**35)
    header = hf_format.read_header(path)
    assert header.tensors["model.layers.0.w"].nbytes == 2**35
    assert header.size == 8 + len(header_json) + 2**35


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\x01\x02", r"is 2 bytes, shorter than the 8-byte length prefix"),
        (struct.pack("<Q", 10**9) + b"{}", r"declares a 1000000000-byte header, over the format's"),
        (struct.pack("<Q", 100) + b"{}", r"declares a 100-byte header but the file is 10 bytes"),
        (struct.pack("<Q", 4) + b"nope", r"header is not JSON"),
        (struct.pack("<Q", 2) + b"[]", r"header is a JSON list, not an object"),
    ],
)
def test_corrupt_headers_are_named(tmp_path: Path, blob: bytes, match: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(hf.CheckpointError, match=rf"^header corrupt: {path}.* {match}"):
        hf_format.read_header(path)


def _raw_file(path: Path, entries: dict[str, object], data: int) -> None:
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * data)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (
            {"dtype": "F16", "shape": [4], "data_offsets": [0, 6]},
            r"spans data bytes \[0, 6\) but F16 \[4\] needs 8 bytes",
        ),
        ({"dtype": "Q9", "shape": [4], "data_offsets": [0, 4]}, r"unknown dtype 'Q9'"),
        ({"dtype": "F16", "shape": [-1], "data_offsets": [0, 4]}, r"bad shape \[-1\]"),
        ({"dtype": "F16", "shape": [2], "data_offsets": [4]}, r"bad data_offsets \[4\]"),
        ({"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}, r"12 bits: not a whole number"),
    ],
)
def test_bad_tensor_entries_are_named(tmp_path: Path, entry: object, match: str) -> None:
    path = tmp_path / "model.safetensors"
    _raw_file(path, {"x": entry}, 8)
    with pytest.raises(hf.CheckpointError, match=rf"^header corrupt: tensor x in {path} .*{match}"):
        hf_format.read_header(path)


def test_packed_four_bit_tensors_are_half_a_byte_per_element(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    _raw_file(path, {"x": {"dtype": "F4", "shape": [2, 6], "data_offsets": [0, 6]}}, 6)
    assert hf_format.read_header(path).tensors["x"].nbytes == 6


def test_a_checkpoint_cut_short_or_pointing_outside_is_refused(tmp_path: Path) -> None:
    d = _single(tmp_path)
    path = d / hf.SINGLE_FILE
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(
        hf.CheckpointError,
        match=rf"file truncated: tensor \S+ in {path} ends at byte {size} but the file is {size - 10} bytes",
    ):
        hf.load_profile(d)
    (d / hf.INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "../elsewhere.safetensors"}}))
    with pytest.raises(
        hf.CheckpointError, match=r"names shard '\.\./elsewhere.*outside the checkpoint"
    ):
        hf.load_profile(d)


def test_missing_layers_and_files(tmp_path: Path) -> None:
    d = _single(tmp_path)
    (d / "config.json").write_text(json.dumps(_config(5)))
    with pytest.raises(hf.CheckpointError, match="says 5 layers"):
        hf.load_profile(d)
    with pytest.raises(hf.CheckpointError, match=r"config\.json"):
        hf.load_profile(tmp_path / "nowhere")
    (d / "config.json").write_text(json.dumps(_config(len(INTER))))
    no_norm = {k: v for k, v in _tensors(False).items() if k != "model.norm.weight"}
    save_file(no_norm, str(d / hf.SINGLE_FILE))
    # The worker could not load the last stage (agents.loader requires the norm): refuse to plan.
    with pytest.raises(hf.CheckpointError, match=r"no final norm tensor \(model\.norm\.\*\)"):
        hf.load_profile(d)


def test_planner_uses_real_unequal_sizes(tmp_path: Path) -> None:
    d = _single(tmp_path)
    prof = resolve(f"hf:{d}")
    out = plan(Problem(prof, fleet_of(DEMO), 128, 1))
    # Each stage's weights: its layers, plus the embeddings on the first and the head on the last.
    layers = _expected_layer_bytes()
    for s in out.stages:
        ends = prof.end_bytes(s.embeddings, s.head)
        assert s.weight_bytes == sum(layers[s.layer_start : s.layer_end]) + ends
    assert (
        sum(s.weight_bytes for s in out.stages) == sum(layers) + prof.embed_bytes + prof.head_bytes
    )
