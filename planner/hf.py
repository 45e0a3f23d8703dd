"""Read a local Hugging Face-format checkpoint without reading tensor data.

A checkpoint is a directory with ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file). A safetensors file
starts with an 8-byte little-endian header length N, then N bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte
right after the header), so every tensor's exact size and position come from the header alone.

Public API (also used by the worker, ``agents/worker.py``, to load exactly a layer range):

- :func:`read_header` — one file's tensors as :class:`TensorInfo` (absolute file offsets).
- :func:`checkpoint_tensors` — every tensor of a checkpoint, from the single file or the index.
- :func:`layout` / :class:`Layout` — tensors grouped into layers (``model.layers.<i>.*``),
  embeddings (``model.embed_tokens``), final norm (``model.norm``) and head (``lm_head``, or the
  embeddings when ``tie_word_embeddings``).
- :func:`tensors_for_stage` — exactly the tensors a stage ``[layer_start, layer_end)`` needs.
- :func:`read_config`, :func:`card_from_config`, :func:`load_profile` — the planner's view.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bus.messages import ModelCard
from planner.profile import ModelProfile, card_params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit

DTYPE_BYTES: dict[str, float] = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F4": 0.5,
}
TORCH_DTYPE_BYTES = {
    "float32": 4.0,
    "float16": 2.0,
    "bfloat16": 2.0,
    "float64": 8.0,
    "int8": 1.0,
    "uint8": 1.0,
    "float8_e4m3fn": 1.0,
}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EMBED_NAMES = (
    "model.embed_tokens.",
    "embed_tokens.",
    "model.language_model.embed_tokens.",
    "transformer.wte.",
)
NORM_NAMES = ("model.norm.", "norm.", "model.language_model.norm.", "transformer.ln_f.")
HEAD_NAMES = ("lm_head.",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; ``str()`` names the file and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor: ``file`` holds its bytes at ``[start, end)`` (absolute offsets)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Layout:
    """A checkpoint's tensors by role. ``layers[i]`` lists layer ``i``'s tensors;
    ``head`` is ``lm_head`` or, with tied embeddings, the embedding tensors (``head_tied``)."""

    layers: tuple[tuple[TensorInfo, ...], ...]
    embeddings: tuple[TensorInfo, ...]
    norm: tuple[TensorInfo, ...]
    head: tuple[TensorInfo, ...]
    head_tied: bool = False
    other: tuple[TensorInfo, ...] = field(default=())

    def layer_bytes(self) -> tuple[int, ...]:
        return tuple(sum(t.nbytes for t in layer) for layer in self.layers)


def read_header(path: Path | str) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header (reads only the header bytes)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} bytes is impossible for a {size}-byte file"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():  # pyright: ignore[reportUnknownVariableType]
        if name == "__metadata__":
            continue
        out[str(name)] = _tensor(path, str(name), meta, base, size)  # pyright: ignore[reportUnknownArgumentType]
    return out


def _tensor(path: Path, name: str, meta: Any, base: int, size: int) -> TensorInfo:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: tensor {name!r} entry is not an object")
    m = cast("dict[str, Any]", meta)
    dtype: Any = m.get("dtype")
    shape: Any = m.get("shape")
    offsets: Any = m.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    dims = cast("list[Any]", shape) if isinstance(shape, list) else None
    if dims is None or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    pair = cast("list[Any]", offsets) if isinstance(offsets, list) else None
    if pair is None or len(pair) != 2 or not all(isinstance(o, int) for o in pair):
        raise CheckpointError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}")
    begin, end = int(pair[0]), int(pair[1])
    if not 0 <= begin <= end or base + end > size:
        raise CheckpointError(
            f"{path}: tensor {name!r} offsets [{begin}, {end}) fall outside the {size - base}-byte data"
        )
    count = 1
    for d in dims:
        count *= int(d)
    expected = count * DTYPE_BYTES[dtype]
    if dtype != "F4" and expected != end - begin:
        raise CheckpointError(
            f"{path}: tensor {name!r} is {end - begin} bytes but {dtype}{dims} needs {expected:.0f}"
        )
    return TensorInfo(
        name=name,
        file=path,
        dtype=dtype,
        shape=tuple(int(d) for d in dims),
        start=base + begin,
        end=base + end,
    )


def checkpoint_tensors(directory: Path | str) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in ``directory`` (single file or sharded index)."""
    d = Path(directory)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            data: Any = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{index}: {exc}") from exc
        raw_map: Any = (
            cast("dict[str, Any]", data).get("weight_map") if isinstance(data, dict) else None
        )
        if not isinstance(raw_map, dict) or not raw_map:
            raise CheckpointError(f"{index}: no weight_map")
        weight_map = {str(k): str(v) for k, v in cast("dict[Any, Any]", raw_map).items()}
        files = sorted(set(weight_map.values()))
        out: dict[str, TensorInfo] = {}
        for name in files:
            shard = d / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise CheckpointError(
                    f"{index}: shard path {name!r} leaves the checkpoint directory"
                )
            out.update(read_header(shard))
        missing = [k for k in weight_map if k not in out]
        if missing:
            raise CheckpointError(
                f"{index}: {len(missing)} tensors listed but absent from the shards, e.g. {missing[0]!r}"
            )
        return out
    single = d / SINGLE_FILE
    if single.is_file():
        return read_header(single)
    raise CheckpointError(f"{d}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def read_config(directory: Path | str) -> dict[str, Any]:
    """``config.json`` (the text model's part of a multimodal config, if nested)."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    cfg: dict[str, Any] = config  # pyright: ignore[reportUnknownVariableType]
    text = cfg.get("text_config")
    if isinstance(text, dict):
        merged: dict[str, Any] = {**cfg, **text}  # pyright: ignore[reportUnknownArgumentType]
        return merged
    return cfg


def _int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def dtype_bytes(config: dict[str, Any]) -> float:
    """Bytes per parameter from ``dtype`` (transformers 5.x) or ``torch_dtype`` (older)."""
    name = config.get("dtype", config.get("torch_dtype", "bfloat16"))
    if not isinstance(name, str):
        raise CheckpointError(f"config.json: dtype must be a string, got {name!r}")
    return TORCH_DTYPE_BYTES.get(name.removeprefix("torch."), 2.0)


def rope_theta(config: dict[str, Any]) -> float | None:
    """``rope_parameters.rope_theta`` (transformers 5.x) or top-level ``rope_theta`` (older)."""
    params = config.get("rope_parameters")
    value = params.get("rope_theta") if isinstance(params, dict) else config.get("rope_theta")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return float(value) if isinstance(value, int | float) else None  # pyright: ignore[reportUnknownArgumentType]


def card_from_config(config: dict[str, Any], name: str) -> ModelCard:
    heads = _int(config, "num_attention_heads")
    hidden = _int(config, "hidden_size")
    experts = config.get("num_local_experts", config.get("num_experts", 1)) or 1
    return ModelCard(
        name=name[:128] or "checkpoint",
        layers=_int(config, "num_hidden_layers"),
        hidden=hidden,
        intermediate=_int(config, "intermediate_size", hidden * 4),
        heads=heads,
        kv_heads=_int(config, "num_key_value_heads", heads),
        vocab=_int(config, "vocab_size"),
        head_dim=_int(config, "head_dim", hidden // heads),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        bytes_per_param=dtype_bytes(config),
        experts=int(experts),
        experts_per_token=int(config.get("num_experts_per_tok", 1) or 1),
        moe_intermediate=config.get("moe_intermediate_size"),
        attention_bias=bool(config.get("attention_bias", False)),
    )


def layout(tensors: dict[str, TensorInfo], *, layers: int, tied: bool) -> Layout:
    """Group tensors by role; every layer ``0..layers-1`` must be present."""
    by_layer: dict[int, list[TensorInfo]] = {}
    embed: list[TensorInfo] = []
    norm: list[TensorInfo] = []
    head: list[TensorInfo] = []
    other: list[TensorInfo] = []
    for t in sorted(tensors.values(), key=lambda t: t.name):
        if m := _LAYER.search(t.name):
            by_layer.setdefault(int(m.group(1)), []).append(t)
        elif t.name.startswith(EMBED_NAMES):
            embed.append(t)
        elif t.name.startswith(NORM_NAMES):
            norm.append(t)
        elif t.name.startswith(HEAD_NAMES):
            head.append(t)
        else:
            other.append(t)
    found = sorted(by_layer)
    if found != list(range(layers)):
        missing = sorted(set(range(layers)) - set(found))
        extra = sorted(set(found) - set(range(layers)))
        raise CheckpointError(
            f"config.json says {layers} layers but the tensors hold layers {found[:3]}...{found[-3:] if found else []} "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    if not embed:
        raise CheckpointError("no embedding tensor (model.embed_tokens.*) in the checkpoint")
    head_tied = False
    if not head:
        if not tied:
            raise CheckpointError("no lm_head.* tensor and tie_word_embeddings is false")
        head, head_tied = list(embed), True
    return Layout(
        layers=tuple(tuple(by_layer[i]) for i in range(layers)),
        embeddings=tuple(embed),
        norm=tuple(norm),
        head=tuple(head),
        head_tied=head_tied,
        other=tuple(other),
    )


def checkpoint_layout(directory: Path | str) -> Layout:
    """The :class:`Layout` of the checkpoint in ``directory`` (config + headers only)."""
    config = read_config(directory)
    return layout(
        checkpoint_tensors(directory),
        layers=_int(config, "num_hidden_layers"),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def tensors_for_stage(
    lay: Layout, layer_start: int, layer_end: int, *, embeddings: bool, head: bool
) -> list[TensorInfo]:
    """The tensors a stage holding layers ``[layer_start, layer_end)`` loads: its layers, plus
    the embeddings on the first stage and the final norm and head on the last (with tied
    embeddings the last stage loads the embedding matrix as its head)."""
    if not 0 <= layer_start < layer_end <= len(lay.layers):
        raise ValueError(f"layer range [{layer_start}, {layer_end}) outside 0..{len(lay.layers)}")
    out = [t for layer in lay.layers[layer_start:layer_end] for t in layer]
    if embeddings:
        out.extend(lay.embeddings)
    if head:
        out.extend(lay.norm)
        out.extend(t for t in lay.head if not (embeddings and lay.head_tied))
    return out


def load_profile(directory: str | Path) -> ModelProfile:
    """The planner's profile of a checkpoint, with exact per-layer bytes from its headers."""
    d = Path(directory).expanduser()
    config = read_config(d)
    name = f"hf:{directory}"
    card = card_from_config(config, name)
    lay = layout(checkpoint_tensors(d), layers=card.layers, tied=card.tied_embeddings)
    head_dim = card.head_dim or card.hidden // card.heads
    kv = 2 * card.kv_heads * head_dim * 2  # fp16 KV cache
    expert_bytes = (
        tuple(sum(t.nbytes for t in layer if ".experts." in t.name) for layer in lay.layers)
        if card.experts > 1
        else ()
    )
    return ModelProfile(
        name=name,
        layer_bytes=lay.layer_bytes(),
        kv_bytes_per_token=(kv,) * card.layers,
        embed_bytes=sum(t.nbytes for t in lay.embeddings),
        head_bytes=sum(t.nbytes for t in lay.head) + sum(t.nbytes for t in lay.norm),
        hidden=card.hidden,
        layer_expert_bytes=expert_bytes,
        experts=card.experts,
        experts_per_token=card.experts_per_token,
        params=card_params(card),
    )
