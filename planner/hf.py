"""The planner's view of a local Hugging Face-format checkpoint: exact bytes from its headers.

The format itself (headers, index, config, which tensor is a layer, the embeddings, the final
norm or the head) is read by :mod:`bus.checkpoint`, shared with the worker's loader, so the
bytes the plan promises per stage are the bytes the worker reads.

- :func:`checkpoint_tensors` — every tensor of a checkpoint, from the single file or the index.
- :func:`layout` / :class:`Layout` — tensors grouped into layers (``model.layers.<i>.*``),
  embeddings (``model.embed_tokens``), final norm (``model.norm``) and head (``lm_head``, or the
  embeddings when ``tie_word_embeddings``).
- :func:`card_from_config`, :func:`load_profile` — the planner's model card and byte profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardplane.bus.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    TensorInfo,
    end_role,
    layer_of,
    num_layers,
    positive_int,
    read_config,
    read_header,
    read_index,
    tied_embeddings,
)
from shardplane.bus.messages import ModelCard
from shardplane.planner.profile import ModelProfile, card_params

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointError",
    "Layout",
    "TensorInfo",
    "card_from_config",
    "checkpoint_layout",
    "checkpoint_tensors",
    "dtype_bytes",
    "layout",
    "load_profile",
    "read_config",
    "rope_theta",
]

TORCH_DTYPE_BYTES = {
    "float32": 4.0,
    "float16": 2.0,
    "bfloat16": 2.0,
    "float64": 8.0,
    "int8": 1.0,
    "uint8": 1.0,
    "float8_e4m3fn": 1.0,
}


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


def checkpoint_tensors(directory: Path | str) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in ``directory`` (single file or sharded index).

    Unlike the worker, which checks only the tensors of its stage, the planner refuses a
    checkpoint with any tensor listed but absent or cut off: a plan over it would fail to load."""
    d = Path(directory)
    weight_map = read_index(d)
    if weight_map is None:
        if not (d / SINGLE_FILE).is_file():
            raise CheckpointError(f"file missing: neither {SINGLE_FILE} nor {INDEX_FILE} in {d}")
        weight_map = dict.fromkeys(read_header(d / SINGLE_FILE).tensors, SINGLE_FILE)
    out: dict[str, TensorInfo] = {}
    for file in sorted(set(weight_map.values())):
        header = read_header(d / file, file=file)
        for info in header.tensors.values():
            header.check_within(info)
        out.update(header.tensors)
    for name, file in weight_map.items():
        if name not in out:
            raise CheckpointError(f"tensor {name} missing from {file} (listed in {INDEX_FILE})")
    return out


def dtype_bytes(config: dict[str, Any]) -> float:
    """Bytes per parameter from ``dtype`` (transformers 5.x) or ``torch_dtype`` (older)."""
    name = config.get("dtype", config.get("torch_dtype", "bfloat16"))
    if not isinstance(name, str):
        raise CheckpointError(f"config corrupt: config.json dtype must be a string, got {name!r}")
    return TORCH_DTYPE_BYTES.get(name.removeprefix("torch."), 2.0)


def rope_theta(config: dict[str, Any]) -> float | None:
    """``rope_parameters.rope_theta`` (transformers 5.x) or top-level ``rope_theta`` (older)."""
    params = config.get("rope_parameters")
    value = params.get("rope_theta") if isinstance(params, dict) else config.get("rope_theta")  # pyright: ignore[reportUnknownVariableType]
    return float(value) if isinstance(value, int | float) else None


def card_from_config(config: dict[str, Any], name: str) -> ModelCard:
    heads = positive_int(config, "num_attention_heads")
    hidden = positive_int(config, "hidden_size")
    experts = config.get("num_local_experts", config.get("num_experts", 1)) or 1
    return ModelCard(
        name=name[:128] or "checkpoint",
        layers=num_layers(config),
        hidden=hidden,
        intermediate=positive_int(config, "intermediate_size", hidden * 4),
        heads=heads,
        kv_heads=positive_int(config, "num_key_value_heads", heads),
        vocab=positive_int(config, "vocab_size"),
        head_dim=positive_int(config, "head_dim", hidden // heads),
        tied_embeddings=tied_embeddings(config),
        bytes_per_param=dtype_bytes(config),
        experts=int(experts),
        experts_per_token=int(config.get("num_experts_per_tok", 1) or 1),
        moe_intermediate=config.get("moe_intermediate_size"),
        attention_bias=bool(config.get("attention_bias", False)),
    )


def layout(tensors: dict[str, TensorInfo], *, layers: int, tied: bool) -> Layout:
    """Group tensors by role; every layer ``0..layers-1`` must be present."""
    by_layer: dict[int, list[TensorInfo]] = {}
    ends: dict[str | None, list[TensorInfo]] = {"embed": [], "norm": [], "head": [], None: []}
    for t in sorted(tensors.values(), key=lambda t: t.name):
        if (at := layer_of(t.name)) is not None:
            by_layer.setdefault(at[0], []).append(t)
        else:
            ends[end_role(t.name)].append(t)
    embed, norm, head, other = ends["embed"], ends["norm"], ends["head"], ends[None]
    found = sorted(by_layer)
    if found != list(range(layers)):
        missing = sorted(set(range(layers)) - set(found))
        extra = sorted(set(found) - set(range(layers)))
        raise CheckpointError(
            f"config.json says {layers} layers but the tensors hold layers "
            f"{found[:3]}...{found[-3:] if found else []} "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    # The same tensors the worker requires of the first and last stage (agents.loader).
    if not embed:
        raise CheckpointError("no embedding tensor (model.embed_tokens.*) in the checkpoint")
    if not norm:
        raise CheckpointError("no final norm tensor (model.norm.*) in the checkpoint")
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
    config = read_config(Path(directory))
    return layout(
        checkpoint_tensors(directory), layers=num_layers(config), tied=tied_embeddings(config)
    )


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
    embed_bytes = sum(t.nbytes for t in lay.embeddings)
    return ModelProfile(
        name=name,
        layer_bytes=lay.layer_bytes(),
        kv_bytes_per_token=(kv,) * card.layers,
        embed_bytes=embed_bytes,
        head_bytes=sum(t.nbytes for t in lay.head) + sum(t.nbytes for t in lay.norm),
        # Tied and no lm_head: the head *is* the embedding matrix, which a stage holding both
        # ends loads once (agents.loader does exactly that).
        tied_bytes=embed_bytes if lay.head_tied else 0,
        hidden=card.hidden,
        layer_expert_bytes=expert_bytes,
        experts=card.experts,
        experts_per_token=card.experts_per_token,
        params=card_params(card),
        attention_dim=card.heads * head_dim,
    )
