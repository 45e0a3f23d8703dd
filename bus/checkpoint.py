"""The on-disk format of a Hugging Face checkpoint, read without reading any tensor data.

One implementation for both sides of a placement: the planner (``planner.hf``: exact bytes per
layer, hence each stage's ``weight_bytes``) and the worker (``agents.loader``: which bytes of which
file to read). Two readers could disagree on a size, an offset or a config key; one cannot.

A checkpoint is a directory with ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file). A safetensors file
starts with an 8-byte little-endian header length N, then N bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte right
after the header), so every tensor's exact size and position come from the header alone.

Errors are :class:`CheckpointError` whose message names the file and the numbers (the worker
passes it on verbatim as ``ShardStatus.reason``, the planner as the error message).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal, cast

import msgspec

from shardplane.bus.errors import BusError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

# Bits per element. Sub-byte types (F4) are packed: a tensor's bytes are elements x bits / 8.
DTYPE_BITS: dict[str, int] = {
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F32": 32,
    "I32": 32,
    "U32": 32,
    "F16": 16,
    "BF16": 16,
    "I16": 16,
    "U16": 16,
    "I8": 8,
    "U8": 8,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F4": 4,
}


class CheckpointError(BusError, ValueError):
    """A checkpoint that cannot be used; ``str()`` names the file and what is wrong with it."""


class TensorInfo(msgspec.Struct, frozen=True):
    """Where one tensor's bytes are: absolute ``[begin, end)`` in ``file`` (a name relative to
    the checkpoint directory, as the index gives it)."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class Header(msgspec.Struct, frozen=True):
    """One safetensors file's header: its tensors, and the file's size when it was read."""

    path: str
    size: int
    data_start: int
    tensors: dict[str, TensorInfo]

    def check_within(self, info: TensorInfo, size: int | None = None) -> None:
        """Raise unless the tensor's bytes all lie in the file, ``size`` bytes long (default: its
        size when the header was read). Checked per tensor, not when the header is read, so a
        truncated tail fails only what it cut off."""
        size = self.size if size is None else size
        if info.end > size:
            raise CheckpointError(
                f"file truncated: tensor {info.name} in {self.path} ends at byte {info.end} "
                f"but the file is {size} bytes"
            )


# --- headers ----------------------------------------------------------------------------------


def read_header(path: Path, *, file: str | None = None) -> Header:
    """Parse and validate one safetensors header (reads only the header bytes).

    Every entry is checked: known dtype, non-negative shape, ordered offsets, and size equal to
    elements x width. ``file`` is the name the tensors record (default: the file's name)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"header corrupt: {path} is {size} bytes, shorter than the 8-byte length prefix"
                )
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"header corrupt: {path} declares a {length}-byte header, over the "
                    f"format's {MAX_HEADER_BYTES}-byte limit"
                )
            if 8 + length > size:
                raise CheckpointError(
                    f"header corrupt: {path} declares a {length}-byte header but the file is "
                    f"{size} bytes"
                )
            raw = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"file missing: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"header corrupt: {path} header is not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(
            f"header corrupt: {path} header is a JSON {type(parsed).__name__}, not an object"
        )
    data_start = 8 + length
    name = file if file is not None else path.name
    tensors: dict[str, TensorInfo] = {}
    for key, value in cast(dict[str, Any], parsed).items():
        if key != "__metadata__":
            tensors[key] = _tensor(path, name, key, value, data_start)
    return Header(path=str(path), size=size, data_start=data_start, tensors=tensors)


def _tensor(path: Path, file: str, key: str, value: Any, data_start: int) -> TensorInfo:
    where = f"tensor {key} in {path}"
    if not isinstance(value, dict):
        raise CheckpointError(f"header corrupt: {where} is not an object")
    entry = cast(dict[str, Any], value)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(f"header corrupt: {where} has unknown dtype {dtype!r}")
    dims = cast(list[Any], shape) if isinstance(shape, list) else None
    if dims is None or not all(type(d) is int and d >= 0 for d in dims):
        raise CheckpointError(f"header corrupt: {where} has bad shape {shape!r}")
    pair = cast(list[Any], offsets) if isinstance(offsets, list) else None
    if pair is None or len(pair) != 2 or not all(type(o) is int for o in pair):
        raise CheckpointError(f"header corrupt: {where} has bad data_offsets {offsets!r}")
    begin, end = cast(list[int], pair)
    bits = math.prod(cast(list[int], dims)) * DTYPE_BITS[dtype]
    if bits % 8:
        raise CheckpointError(
            f"header corrupt: {where} is {dtype} {dims}, {bits} bits: not a whole number of bytes"
        )
    if not 0 <= begin <= end or end - begin != bits // 8:
        raise CheckpointError(
            f"header corrupt: {where} spans data bytes [{begin}, {end}) "
            f"but {dtype} {dims} needs {bits // 8} bytes"
        )
    return TensorInfo(
        name=key,
        file=file,
        dtype=dtype,
        shape=tuple(cast(list[int], dims)),
        begin=data_start + begin,
        end=data_start + end,
    )


# --- index and config -------------------------------------------------------------------------


def read_index(root: Path) -> dict[str, str] | None:
    """tensor name -> shard file from ``model.safetensors.index.json``; None without an index.

    Shard names must stay inside the checkpoint directory (an index is data, not a path list)."""
    index = root / INDEX_FILE
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"index corrupt: {index}: {exc}") from None
    mapping = cast(dict[str, Any], data).get("weight_map") if isinstance(data, dict) else None
    if (
        not isinstance(mapping, dict)
        or not mapping
        or not all(isinstance(v, str) for v in cast(dict[str, Any], mapping).values())
    ):
        raise CheckpointError(f"index corrupt: {index} has no weight_map of tensor -> file")
    out = dict(cast(dict[str, str], mapping))
    for file in set(out.values()):
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise CheckpointError(
                f"index corrupt: {index} names shard {file!r}, outside the checkpoint directory"
            )
    return out


def read_config(root: Path) -> dict[str, Any]:
    """``config.json``; a multimodal model's ``text_config`` is merged over the top level, since
    the text model is what is split into stages."""
    path = root / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"file missing: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"config corrupt: {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"config corrupt: {path} is not a JSON object")
    config = cast(dict[str, Any], data)
    text = config.get("text_config")
    if isinstance(text, dict):
        return {**config, **cast(dict[str, Any], text)}
    return config


def positive_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(
            f"config corrupt: {CONFIG_FILE} {key} must be a positive integer, got {value!r}"
        )
    return value


def num_layers(config: dict[str, Any]) -> int:
    return positive_int(config, "num_hidden_layers")


def tied_embeddings(config: dict[str, Any]) -> bool:
    return bool(config.get("tie_word_embeddings", False))


# --- tensor roles -----------------------------------------------------------------------------

# What each tensor is, by name. A stage holds layers [a, b); the first stage also the embeddings,
# the last the final norm and the output head (``lm_head``, or with tie_word_embeddings and no
# lm_head the embedding matrix itself).
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EMBED_NAMES = (
    "model.embed_tokens.",
    "embed_tokens.",
    "model.language_model.embed_tokens.",
    "transformer.wte.",
)
NORM_NAMES = ("model.norm.", "norm.", "model.language_model.norm.", "transformer.ln_f.")
HEAD_NAMES = ("lm_head.",)

EndRole = Literal["embed", "norm", "head"]


def layer_of(name: str) -> tuple[int, str] | None:
    """(layer index, the name's part after ``layers.<i>.``) for a per-layer tensor, else None."""
    m = _LAYER_RE.search(name)
    return (int(m.group(1)), name[m.end() :]) if m else None


def end_role(name: str) -> EndRole | None:
    """What a tensor outside the layers is: embeddings, final norm, head, or None (unused)."""
    if name.startswith(EMBED_NAMES):
        return "embed"
    if name.startswith(NORM_NAMES):
        return "norm"
    if name.startswith(HEAD_NAMES):
        return "head"
    return None
