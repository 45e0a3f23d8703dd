"""What a pipeline stage is and where its bytes are: the stage spec, which tensors it needs, and
the checkpoint's index of them (headers only; no data byte is read here).

Split from the loader so that the pure selection (``stage_tensor_names``) and the checkpoint
index (``Checkpoint``, ``stage_bytes``) read apart from the copying machinery. Errors are
``LoadError`` with a message naming the file, tensor, layer and numbers: it travels to the
operator verbatim in ``ShardStatus.reason``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from shardplane.bus.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    Header,
    TensorInfo,
    end_role,
    layer_of,
    num_layers,
    read_config,
    read_header,
    read_index,
    tied_embeddings,
)
from shardplane.bus.errors import AgentError


class LoadError(AgentError):
    """A stage could not be loaded; ``str()`` is the operator-facing reason."""


class LoadCancelled(LoadError):
    """The load was abandoned on purpose (worker stopping, or a newer plan moved the layers)."""


class StageSpec(msgspec.Struct, frozen=True):
    layer_start: int
    layer_end: int
    embeddings: bool = False
    head: bool = False


class Config(msgspec.Struct, frozen=True):
    layers: int
    tied: bool


@contextlib.contextmanager
def _as_load_error() -> Generator[None]:
    """The shared reader's CheckpointError, as this module's LoadError (same message)."""
    try:
        yield
    except CheckpointError as exc:
        raise LoadError(str(exc)) from None


# --- selection (pure) -------------------------------------------------------------------------


def stage_tensor_names(
    names: Iterable[str], spec: StageSpec, *, layers: int, tied: bool
) -> list[str]:
    """The tensors a stage holds, by name, in a stable order (pure; headers not needed).

    Layers [layer_start, layer_end), plus the embeddings on the first stage and the final norm
    and head on the last. The head is ``lm_head.*``; without it and with tie_word_embeddings the
    embedding matrix is the head, held once when the same stage also holds the embeddings.
    A layer in range must have every per-layer tensor that any layer of the checkpoint has, so a
    tensor missing from the index or header is named with its layer.
    """
    all_names = sorted(set(names))
    if not 0 <= spec.layer_start < spec.layer_end <= layers:
        raise LoadError(
            f"layer range [{spec.layer_start}, {spec.layer_end}) is outside the checkpoint's "
            f"{layers} layers"
        )
    by_layer: dict[int, dict[str, str]] = {}  # layer -> {suffix after "layers.<i>.": name}
    ends: dict[str, list[str]] = {"embed": [], "norm": [], "head": []}
    for n in all_names:
        if (at := layer_of(n)) is not None:
            by_layer.setdefault(at[0], {})[at[1]] = n
        elif (role := end_role(n)) is not None:
            ends[role].append(n)
    embed, norm, head = ends["embed"], ends["norm"], ends["head"]
    example: dict[str, tuple[int, str]] = {}  # suffix -> (a layer that has it, its name)
    for i in sorted(by_layer, reverse=True):
        for suffix, name in by_layer[i].items():
            example[suffix] = (i, name)
    chosen: list[str] = []
    for layer in range(spec.layer_start, spec.layer_end):
        have = by_layer.get(layer, {})
        if not have:
            raise LoadError(
                f"tensor missing for layer {layer}: the checkpoint has no layers.{layer}.* tensors"
            )
        missing = sorted(set(example) - set(have))
        if missing:
            j, name = example[missing[0]]
            wanted = name.replace(f"layers.{j}.", f"layers.{layer}.", 1)
            raise LoadError(
                f"tensor missing for layer {layer}: {wanted} "
                f"(layer {layer} has {len(have)} of {len(example)} per-layer tensors)"
            )
        chosen += [have[s] for s in sorted(have)]
    if spec.embeddings:
        if not embed:
            raise LoadError(
                "tensor missing: no embedding tensor (model.embed_tokens.*) for the first stage"
            )
        chosen = embed + chosen
    if spec.head:
        if not norm:
            raise LoadError("tensor missing: no final norm (model.norm.*) for the last stage")
        chosen += norm
        if head:
            chosen += head
        elif not tied:
            raise LoadError("tensor missing: no lm_head.* tensor and tie_word_embeddings is false")
        elif not embed:
            raise LoadError("tensor missing: tied output head but no model.embed_tokens.* tensor")
        elif not spec.embeddings:
            chosen += embed  # tied: the output head is the embedding matrix
    return chosen


# --- the checkpoint ---------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint directory opened lazily: only the files a stage needs are ever opened."""

    root: Path
    config: Config
    files_by_tensor: dict[str, str]
    _headers: dict[str, Header] = field(default_factory=lambda: {})

    @classmethod
    def open(cls, root: Path | str) -> Checkpoint:
        path = Path(root)
        if not path.is_dir():
            raise LoadError(f"file missing: checkpoint directory {path} does not exist")
        with _as_load_error():
            raw = read_config(path)
            config = Config(layers=num_layers(raw), tied=tied_embeddings(raw))
            files = read_index(path)
        ckpt = cls(root=path, config=config, files_by_tensor=files or {})
        if files is None:  # no index: the single file's header is the list of tensors
            if not (path / SINGLE_FILE).is_file():
                raise LoadError(f"file missing: neither {INDEX_FILE} nor {SINGLE_FILE} in {path}")
            ckpt.files_by_tensor = dict.fromkeys(ckpt.header(SINGLE_FILE).tensors, SINGLE_FILE)
        return ckpt

    def header(self, file: str) -> Header:
        if file not in self._headers:
            path = self.root / file
            if not path.exists():
                raise LoadError(
                    f"file missing: shard file {file} (listed in {INDEX_FILE}) is not in {self.root}"
                )
            with _as_load_error():
                self._headers[file] = read_header(path, file=file)
        return self._headers[file]

    def refs(self, spec: StageSpec) -> list[TensorInfo]:
        """The stage's tensors with their byte ranges, each checked to lie inside its file (as
        the file is now: a file cut short since its header was read fails here, before a read)."""
        names = stage_tensor_names(
            self.files_by_tensor, spec, layers=self.config.layers, tied=self.config.tied
        )
        out: list[TensorInfo] = []
        sizes: dict[str, int] = {}
        for name in names:
            file = self.files_by_tensor[name]
            header = self.header(file)
            info = header.tensors.get(name)
            if info is None:
                raise LoadError(f"tensor {name} missing from {file}")
            if file not in sizes:
                try:
                    sizes[file] = (self.root / file).stat().st_size
                except FileNotFoundError:
                    raise LoadError(f"file missing: {self.root / file}") from None
            with _as_load_error():
                header.check_within(info, sizes[file])
            out.append(info)
        return out


def checkpoint_dir(model: str) -> Path:
    """``hf:<dir>`` -> the directory (``~`` expanded)."""
    if not model.startswith("hf:"):
        raise LoadError(f"model {model!r} is not an hf:<dir> checkpoint")
    return Path(os.path.expanduser(model[3:]))


def stage_bytes(root: Path | str, spec: StageSpec) -> int:
    """Bytes the stage holds, from the headers alone (what the plan's weight_bytes must equal)."""
    return sum(r.nbytes for r in Checkpoint.open(root).refs(spec))
