"""Tiny Llama-format checkpoints written with the safetensors library, for the worker tests.

Layers have unequal sizes (the MLP width grows with the layer index) so that a plan which
assumed equal layers, or a loader that read the wrong range, shows up as a byte mismatch.
Values are deterministic per tensor so loaded data can be compared with the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors.numpy import save_file  # pyright: ignore[reportUnknownVariableType]

from shardplane.agents.worker import Worker

LAYER_SUFFIXES = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def tensors(
    layers: int = 6,
    hidden: int = 32,
    kv: int = 16,
    vocab: int = 64,
    intermediate: int = 48,
    tied: bool = False,
    grow: int = 16,
) -> dict[str, npt.NDArray[np.generic]]:
    rng = np.random.default_rng(7)

    def t(shape: tuple[int, ...], dtype: type[np.generic] = np.float16) -> npt.NDArray[np.generic]:
        return rng.standard_normal(shape).astype(dtype)

    out: dict[str, npt.NDArray[np.generic]] = {"model.embed_tokens.weight": t((vocab, hidden))}
    for i in range(layers):
        inter = intermediate + grow * i  # unequal layers
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = t((hidden,), np.float32)
        out[p + "post_attention_layernorm.weight"] = t((hidden,), np.float32)
        out[p + "self_attn.q_proj.weight"] = t((hidden, hidden))
        out[p + "self_attn.k_proj.weight"] = t((kv, hidden))
        out[p + "self_attn.v_proj.weight"] = t((kv, hidden))
        out[p + "self_attn.o_proj.weight"] = t((hidden, hidden))
        out[p + "mlp.gate_proj.weight"] = t((inter, hidden))
        out[p + "mlp.up_proj.weight"] = t((inter, hidden))
        out[p + "mlp.down_proj.weight"] = t((hidden, inter))
    out["model.norm.weight"] = t((hidden,), np.float32)
    if not tied:
        out["lm_head.weight"] = t((vocab, hidden))
    return out


def config(layers: int, hidden: int, vocab: int, tied: bool) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "dtype": "float16",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    }


def write(
    root: Path,
    *,
    layers: int = 6,
    shards: int = 1,
    tied: bool = False,
    hidden: int = 32,
    vocab: int = 64,
    intermediate: int = 48,
    grow: int = 16,
) -> dict[str, npt.NDArray[np.generic]]:
    """Write config.json and either model.safetensors (shards=1) or ``shards`` files plus
    model.safetensors.index.json, splitting by layer the way transformers does. Returns the
    tensors written."""
    root.mkdir(parents=True, exist_ok=True)
    data = tensors(
        layers=layers,
        hidden=hidden,
        kv=hidden // 2,
        vocab=vocab,
        intermediate=intermediate,
        tied=tied,
        grow=grow,
    )
    (root / "config.json").write_text(json.dumps(config(layers, hidden, vocab, tied)))
    if shards == 1:
        save_file(data, str(root / "model.safetensors"))
        return data
    names = list(data)  # insertion order: embed, layers in order, norm, head
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: data[n] for n in names[k * per : (k + 1) * per]}
        if part:
            save_file(part, str(root / file))
            weight_map.update(dict.fromkeys(part, file))
    total = sum(a.nbytes for a in data.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return data


def layer_names(start: int, end: int) -> set[str]:
    return {f"model.layers.{i}.{s}" for i in range(start, end) for s in LAYER_SUFFIXES}


def stage_names(start: int, end: int, layers: int) -> list[str]:
    """The tensor names a worker holds for layers [start, end) of a ``layers``-layer
    checkpoint: those layers, the embedding on the first stage, the norm and head on the last."""
    names = layer_names(start, end)
    if start == 0:
        names.add("model.embed_tokens.weight")
    if end == layers:
        names |= {"model.norm.weight", "lm_head.weight"}
    return sorted(names)


def held_names(worker: Worker) -> list[str]:
    """Every tensor name ``worker`` holds, over all its stages."""
    return sorted(n for names in worker.tensor_names().values() for n in names)


def write_big(root: Path, layers: int = 4, mib_per_layer: int = 48) -> None:
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
