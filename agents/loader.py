"""Load one pipeline stage of a Hugging Face-format checkpoint (``config.json`` + safetensors).

Only the stage's tensors are read: ``model.layers.<i>.*`` for i in [layer_start, layer_end), plus
``model.embed_tokens.*`` on the first stage and ``model.norm.*`` + ``lm_head.*`` on the last (with
tied embeddings the head *is* ``model.embed_tokens.weight``). Headers come first (8-byte
little-endian length + JSON), so every size and offset is known and checked before a data byte is
touched; then each contiguous run of wanted bytes is memory-mapped and copied once into a single
host buffer (numpy), or moved to the GPU with torch when CUDA is available (optional extra).
``read_mode="pread"`` reads the same runs with positional reads instead of a mapping (faster from
a cold page cache on the VMs measured; see bench/shard_load.py). Large runs are copied by a few
threads, which overlaps the page faults and copies that make up most of a host load.

How fast, and why not faster: on this kind of VM a host load is bounded by faulting in fresh
memory (the copy must land somewhere the worker keeps), which a raw read into a reused buffer
never pays; ``shardplane bench shard-load`` prints both baselines.

Errors are ``LoadError`` with a message that names the file, tensor, layer and numbers, because
that message travels to the operator verbatim in ``ShardStatus.reason``.

The header reading here is deliberately minimal and strict; planner/hf.py computes the plan's
per-stage ``weight_bytes`` from the same headers with the same selection rule
(``stage_tensor_names``), and the loader refuses to report ``loaded`` unless the bytes agree.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import msgspec
import numpy as np
import numpy.typing as npt

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
CHUNK_BYTES = 64 * 1024 * 1024  # copy granularity: cancellation and rate-limit checkpoints
PARALLEL_CHUNK = 16 * 1024 * 1024  # per-thread chunk when copying with several threads
PAGE = mmap.ALLOCATIONGRANULARITY

# safetensors dtype -> (numpy dtype used to hold the raw bytes, bytes per element). Types numpy
# lacks (bf16, fp8) are held bit-exact as same-width unsigned ints; torch views them properly.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "F8_E4M3": ("u1", 1),
    "F8_E5M2": ("u1", 1),
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U64": ("<u8", 8),
    "U32": ("<u4", 4),
    "U16": ("<u2", 2),
    "U8": ("u1", 1),
    "BOOL": ("?", 1),
}

# Tensor roles by name, the same rules as planner/hf.py (which computes the plan's bytes); a test
# (tests/worker/test_loader.py) checks both select the same tensors for every stage.
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EMBED_NAMES = (
    "model.embed_tokens.",
    "embed_tokens.",
    "model.language_model.embed_tokens.",
    "transformer.wte.",
)
NORM_NAMES = ("model.norm.", "norm.", "model.language_model.norm.", "transformer.ln_f.")
HEAD_NAMES = ("lm_head.",)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


ReadMode = Literal["mmap", "pread"]


class LoadError(Exception):
    """A stage could not be loaded; ``str()`` is the operator-facing reason."""


class LoadCancelled(LoadError):
    """The load was abandoned on purpose (worker stopping, or a newer plan moved the layers)."""


class TensorRef(msgspec.Struct, frozen=True):
    """Where one tensor's bytes are: absolute [begin, end) in ``file``."""

    name: str
    file: str  # file name relative to the checkpoint directory
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class StageSpec(msgspec.Struct, frozen=True):
    layer_start: int
    layer_end: int
    embeddings: bool = False
    head: bool = False


class Config(msgspec.Struct, frozen=True):
    layers: int
    tied: bool


# --- headers ----------------------------------------------------------------------------------


def read_header(path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns (data_start, {name: (dtype, shape, begin, end)}) with absolute byte offsets. Every
    entry is checked: known dtype, non-negative shape, offsets ordered, size = elements x width.
    Whether a tensor lies inside the file is checked per stage (``Checkpoint.refs``): a truncated
    tail fails the stages whose tensors are cut off, not the ones whose bytes are intact.
    """
    name = path.name
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LoadError(
                    f"header corrupt: {name} is {size} bytes, shorter than the 8-byte length prefix"
                )
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise LoadError(
                    f"header corrupt: {name} declares a {length}-byte header but the file is {size} bytes"
                )
            raw = f.read(length)
    except FileNotFoundError:
        raise LoadError(f"file missing: {path}") from None
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"header corrupt: {name} header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise LoadError(
            f"header corrupt: {name} header is a {type(header).__name__}, not an object"
        )
    data_start = 8 + length
    out: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for key, value in cast(dict[str, Any], header).items():
        if key == "__metadata__":
            continue
        if not isinstance(value, dict):
            raise LoadError(f"header corrupt: {name} entry {key!r} is not an object")
        entry = cast(dict[str, Any], value)
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype not in DTYPES:
            raise LoadError(f"header corrupt: tensor {key} in {name} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and d >= 0 for d in cast(list[Any], shape)
        ):
            raise LoadError(f"header corrupt: tensor {key} in {name} has bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(cast(list[Any], offsets)) != 2
            or not all(isinstance(o, int) for o in cast(list[Any], offsets))
        ):
            raise LoadError(
                f"header corrupt: tensor {key} in {name} has bad data_offsets {offsets!r}"
            )
        dims = tuple(cast(list[int], shape))
        begin, end = cast(list[int], offsets)
        expected = math.prod(dims) * DTYPES[dtype][1]
        if not 0 <= begin <= end or end - begin != expected:
            raise LoadError(
                f"header corrupt: tensor {key} in {name} spans bytes [{begin}, {end}) "
                f"but {dtype} {list(dims)} needs {expected} bytes"
            )
        out[key] = (dtype, dims, data_start + begin, data_start + end)
    return data_start, out


def read_config(root: Path) -> Config:
    path = root / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"file missing: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"config corrupt: {path}: {exc}") from None
    if not isinstance(data, dict):
        raise LoadError(f"config corrupt: {path} is not a JSON object")
    cfg = cast(dict[str, Any], data)
    # Multimodal checkpoints nest the language model's settings under text_config.
    text = cfg.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in cfg:
        cfg = {**cfg, **cast(dict[str, Any], text)}
    layers = cfg.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise LoadError(f"config corrupt: {path} num_hidden_layers is {layers!r}")
    return Config(layers=layers, tied=bool(cfg.get("tie_word_embeddings", False)))


def weight_map(root: Path) -> dict[str, str]:
    """tensor name -> file name, from the sharded index, else from the single file's header."""
    index = root / INDEX_FILE
    if index.exists():
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LoadError(f"index corrupt: {index}: {exc}") from None
        mapping = cast(dict[str, Any], data).get("weight_map") if isinstance(data, dict) else None
        if not isinstance(mapping, dict) or not all(
            isinstance(v, str) for v in cast(dict[str, Any], mapping).values()
        ):
            raise LoadError(f"index corrupt: {index} has no weight_map of tensor -> file")
        return dict(cast(dict[str, str], mapping))
    single = root / SINGLE_FILE
    if not single.exists():
        raise LoadError(f"file missing: neither {INDEX_FILE} nor {SINGLE_FILE} in {root}")
    _, header = read_header(single)
    return dict.fromkeys(header, SINGLE_FILE)


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
    embed: list[str] = []
    norm: list[str] = []
    head: list[str] = []
    for n in all_names:
        if m := _LAYER_RE.search(n):
            by_layer.setdefault(int(m.group(1)), {})[n[m.end() :]] = n
        elif n.startswith(EMBED_NAMES):
            embed.append(n)
        elif n.startswith(NORM_NAMES):
            norm.append(n)
        elif n.startswith(HEAD_NAMES):
            head.append(n)
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
    _headers: dict[str, dict[str, tuple[str, tuple[int, ...], int, int]]] = field(
        default_factory=lambda: {}
    )

    @classmethod
    def open(cls, root: Path | str) -> Checkpoint:
        path = Path(root)
        if not path.is_dir():
            raise LoadError(f"file missing: checkpoint directory {path} does not exist")
        return cls(root=path, config=read_config(path), files_by_tensor=weight_map(path))

    def header(self, file: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        if file not in self._headers:
            path = self.root / file
            if not path.exists():
                raise LoadError(
                    f"file missing: shard file {file} (listed in {INDEX_FILE}) is not in {self.root}"
                )
            self._headers[file] = read_header(path)[1]
        return self._headers[file]

    def size(self, file: str) -> int:
        try:
            return (self.root / file).stat().st_size
        except FileNotFoundError:
            raise LoadError(f"file missing: {self.root / file}") from None

    def refs(self, spec: StageSpec) -> list[TensorRef]:
        names = stage_tensor_names(
            self.files_by_tensor, spec, layers=self.config.layers, tied=self.config.tied
        )
        out: list[TensorRef] = []
        for name in names:
            file = self.files_by_tensor[name]
            entry = self.header(file).get(name)
            if entry is None:
                raise LoadError(f"tensor {name} missing from {file}")
            dtype, shape, begin, end = entry
            size = self.size(file)
            if end > size:
                raise LoadError(
                    f"file truncated: tensor {name} in {file} ends at byte {end} "
                    f"but the file is {size} bytes"
                )
            out.append(TensorRef(name, file, dtype, shape, begin, end))
        return out


def checkpoint_dir(model: str) -> Path:
    """``hf:<dir>`` -> the directory (``~`` expanded)."""
    if not model.startswith("hf:"):
        raise LoadError(f"model {model!r} is not an hf:<dir> checkpoint")
    return Path(os.path.expanduser(model[3:]))


def stage_bytes(root: Path | str, spec: StageSpec) -> int:
    """Bytes the stage holds, from the headers alone (what the plan's weight_bytes must equal)."""
    return sum(r.nbytes for r in Checkpoint.open(root).refs(spec))


# --- loading ----------------------------------------------------------------------------------


def check_plan_bytes(refs: list[TensorRef], spec: StageSpec, expected: int | None) -> None:
    """Fail unless the plan's weight_bytes matches the headers exactly.

    Two exact readings are accepted, because the plan may count a stage's embeddings and head
    inside weight_bytes or flag them separately (``embeddings``/``head``, their size implied by
    the same headers): weight_bytes == every byte the stage holds, or == its layers' bytes.
    Anything else means the files changed since the plan, or plan and loader disagree on what
    the stage holds, and loading it would be reporting a lie.
    """
    if expected is None:
        return
    total = sum(r.nbytes for r in refs)
    layer_bytes = sum(r.nbytes for r in refs if _LAYER_RE.search(r.name))
    if expected in (total, layer_bytes):
        return
    extra = total - layer_bytes
    raise LoadError(
        f"byte mismatch: the headers give {total} bytes for layers "
        f"[{spec.layer_start}, {spec.layer_end}) ({layer_bytes} in layers"
        + (f", {extra} in embeddings/norm/head" if extra else "")
        + f", {len(refs)} tensors) but the plan says weight_bytes={expected}"
    )


@dataclass
class LoadedShard:
    """Tensors of one stage held in memory. ``release()`` drops them so the memory is freed.

    On the host every tensor is a view into one buffer (``host_buffer``), so the stage's memory
    goes back to the OS as soon as the last view is dropped; many mid-size allocations could
    instead stay in the C heap and keep the process's resident set high."""

    tensors: dict[str, Any]
    nbytes: int
    load_ms: float
    where: str
    _buffer: Any = None

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def release(self) -> None:
        self.tensors.clear()
        self._buffer = None


def default_copy_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def host_buffer(nbytes: int) -> npt.NDArray[np.uint8]:
    """One writable host buffer for a whole stage.

    Large buffers are their own anonymous mapping: dropping the last tensor view unmaps it, so
    unloading returns the memory to the OS whatever the C allocator's heuristics, and
    MADV_HUGEPAGE makes faulting it in 512x fewer faults (which is most of a load's cost after
    the copy itself)."""
    if nbytes < 1 << 20:
        return np.empty(nbytes, dtype=np.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(region, dtype=np.uint8)


def _runs(refs: list[TensorRef]) -> list[list[TensorRef]]:
    """Group tensors into runs that are back to back in one file (one mapping per run)."""
    runs: list[list[TensorRef]] = []
    for ref in sorted(refs, key=lambda r: (r.file, r.begin)):
        last = runs[-1][-1] if runs else None
        if last is not None and last.file == ref.file and last.end == ref.begin:
            runs[-1].append(ref)
        else:
            runs.append([ref])
    return runs


def host_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _torch() -> Any:
    """The torch module when the optional ``cuda`` extra is installed, else None (typed Any:
    torch is optional, so strict typing must not depend on its stubs)."""
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def _cuda_device(index: int | None) -> Any:
    """torch.device('cuda:<i>') when torch with CUDA is installed and the device exists."""
    torch = _torch()
    if torch is None:
        return None
    try:
        count = int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return None
    i = index or 0
    return torch.device(f"cuda:{i}") if i < count else None


def load_stage(
    root: Path | str,
    spec: StageSpec,
    *,
    expected_bytes: int | None = None,
    device_index: int | None = None,
    use_cuda: bool = True,
    memory_limit: int | None = None,
    read_limit_bps: float | None = None,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    copy_threads: int | None = None,
    read_mode: ReadMode = "mmap",
) -> LoadedShard:
    """Read exactly the stage's tensors into memory. Blocking: call it in a thread.

    ``expected_bytes`` is the plan's weight_bytes; a mismatch fails before any data is read
    (the plan and the files disagree) and is checked again after the copy. ``memory_limit``
    caps the bytes this load may take (default: the host's available memory).
    ``read_limit_bps`` throttles the copy (operators use it so a load does not starve a serving
    process's I/O; tests use it to make a load last). ``cancel`` is polled between chunks.
    ``copy_threads`` copies with that many threads (default: up to 4, by CPU count).
    ``read_mode``: ``mmap`` (map each run of tensors, copy out of the mapping) or ``pread``
    (positional reads straight into the stage buffer); both read only the stage's bytes. With
    ``mmap`` a file truncated *during* the copy (after the size check) raises SIGBUS, which
    ``pread`` turns into a LoadError; ``pread`` was also faster from a cold page cache here.
    """
    started = time.perf_counter()
    ckpt = Checkpoint.open(root)
    refs = ckpt.refs(spec)
    total = sum(r.nbytes for r in refs)
    where_desc = (
        f"layers [{spec.layer_start}, {spec.layer_end})"
        + (" + embeddings" if spec.embeddings else "")
        + (" + norm/head" if spec.head else "")
    )
    check_plan_bytes(refs, spec, expected_bytes)
    cuda = _cuda_device(device_index) if use_cuda else None
    if cuda is not None:
        # The stage is staged whole in host memory, then copied to the device in one go: simple
        # and fast enough; a chunked copy through a pinned buffer would bound the host memory.
        free, _ = _torch().cuda.mem_get_info(cuda)
        limit = min(int(free), host_available_bytes())
        if memory_limit is not None:
            limit = min(limit, memory_limit)
        where = str(cuda)
    else:
        limit = host_available_bytes() if memory_limit is None else memory_limit
        where = "host"
    if total > limit:
        raise LoadError(
            f"out of memory on {where}: {where_desc} needs {total} bytes ({_gib(total)}) "
            f"but only {limit} bytes ({_gib(limit)}) are available"
        )
    try:
        buffer = host_buffer(total)
    except (MemoryError, OSError):
        raise LoadError(
            f"out of memory on host: allocating {total} bytes ({_gib(total)}) for {where_desc} failed"
        ) from None
    offsets: dict[str, int] = {}
    copied = 0
    threads = copy_threads if copy_threads is not None else default_copy_threads()
    with (
        ThreadPoolExecutor(max_workers=threads) if threads > 1 else contextlib.nullcontext() as pool
    ):
        for run in _runs(refs):
            path = ckpt.root / run[0].file
            copied = _copy_run(
                path, run, buffer, offsets, copied, total, read_limit_bps, started, cancel,
                on_progress, pool, read_mode,
            )  # fmt: skip
    if copied != total:
        raise LoadError(
            f"byte mismatch: copied {copied} bytes of {where_desc}, the headers give {total}"
        )
    tensors: dict[str, Any] = {}
    for ref in refs:
        np_dtype = np.dtype(DTYPES[ref.dtype][0])
        start = offsets[ref.name]
        tensors[ref.name] = buffer[start : start + ref.nbytes].view(np_dtype).reshape(ref.shape)
    held: Any = buffer
    if cuda is not None:
        tensors, held = _to_cuda(offsets, refs, buffer, cuda, total, where)
    return LoadedShard(
        tensors=tensors,
        nbytes=copied,
        load_ms=(time.perf_counter() - started) * 1000.0,
        where=where,
        _buffer=held,
    )


def _copy_run(
    path: Path,
    run: list[TensorRef],
    buffer: npt.NDArray[np.uint8],
    offsets: dict[str, int],
    copied: int,
    total: int,
    read_limit_bps: float | None,
    started: float,
    cancel: threading.Event | None,
    on_progress: Callable[[int, int], None] | None,
    pool: ThreadPoolExecutor | None = None,
    read_mode: ReadMode = "mmap",
) -> int:
    """Read one contiguous run of tensors into ``buffer`` at ``copied``; returns the new fill.

    ``mmap``: map the run and copy out of the mapping. ``pread``: positional reads straight into
    the buffer. Both read exactly the run's bytes (plus the partial page before it, for mmap)."""
    begin, end = run[0].begin, run[-1].end
    aligned = begin - begin % PAGE  # mmap offsets must be page aligned
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise LoadError(f"file missing: {path}") from None
    try:
        size = os.fstat(fd).st_size
        if end > size:  # the file shrank after its header was read
            raise LoadError(
                f"file truncated: tensor {run[-1].name} in {path.name} ends at byte {end} "
                f"but the file is {size} bytes"
            )
        for ref in run:
            offsets[ref.name] = copied + (ref.begin - begin)
        run_bytes = end - begin
        if run_bytes == 0:
            return copied
        dst = buffer[copied : copied + run_bytes]
        if read_mode == "pread":
            view = dst.data

            def read(at: int, stop: int) -> None:
                while at < stop:
                    n = os.preadv(fd, [view[at:stop]], begin + at)
                    if n <= 0:
                        raise LoadError(
                            f"file truncated: {path.name} ended at byte {begin + at} while "
                            f"reading tensor bytes up to {end}"
                        )
                    at += n

            _drive(
                read, run_bytes, copied, total, pool, read_limit_bps, started, cancel, on_progress
            )
            return copied + run_bytes
        mm = mmap.mmap(fd, end - aligned, prot=mmap.PROT_READ, offset=aligned)
        try:
            # Sequential hint: the kernel reads ahead aggressively and drops pages behind.
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            src = np.frombuffer(mm, dtype=np.uint8)[begin - aligned :]
            copy = _copier(dst, src)
            del src
            _drive(
                copy, run_bytes, copied, total, pool, read_limit_bps, started, cancel, on_progress
            )
            del copy
        finally:
            # On an error a traceback may still reference a view of the mapping; then it is
            # unmapped when that goes, not here.
            with contextlib.suppress(BufferError):
                mm.close()
        return copied + run_bytes
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _copier(dst: npt.NDArray[np.uint8], src: npt.NDArray[np.uint8]) -> Callable[[int, int], None]:
    def copy(at: int, stop: int) -> None:
        np.copyto(dst[at:stop], src[at:stop])

    return copy


def _drive(
    step: Callable[[int, int], None],
    n: int,
    copied: int,
    total: int,
    pool: ThreadPoolExecutor | None,
    read_limit_bps: float | None,
    started: float,
    cancel: threading.Event | None,
    on_progress: Callable[[int, int], None] | None,
) -> None:
    """Run ``step(at, end)`` over [0, n) in chunks: in turn across the pool's threads, or one
    after the other when throttled (or without a pool), checking ``cancel`` between chunks.

    Why threads: a host load is page faults (file pages, fresh destination pages) and memcpy;
    numpy and the read syscalls release the GIL, so two or more threads overlap them. Each thread
    walks its own interleaved chunks, so the kernel still sees sequential access per thread."""
    if pool is not None and read_limit_bps is None and n > PARALLEL_CHUNK:
        workers = pool._max_workers  # pyright: ignore[reportPrivateUsage]
        stride = PARALLEL_CHUNK * workers

        def work(first: int) -> None:
            for at in range(first, n, stride):
                if cancel is not None and cancel.is_set():
                    raise LoadCancelled("load cancelled")
                step(at, min(at + PARALLEL_CHUNK, n))

        futures = [pool.submit(work, i * PARALLEL_CHUNK) for i in range(workers)]
        for future in futures:
            future.result()  # re-raises LoadCancelled / LoadError / OSError from a thread
        if on_progress is not None:
            on_progress(copied + n, total)
        return
    done = 0
    while done < n:
        if cancel is not None and cancel.is_set():
            raise LoadCancelled("load cancelled")
        chunk = min(CHUNK_BYTES, n - done)
        step(done, done + chunk)
        done += chunk
        if on_progress is not None:
            on_progress(copied + done, total)
        if read_limit_bps:
            ahead = (copied + done) / read_limit_bps - (time.perf_counter() - started)
            if ahead > 0:
                if cancel is not None:
                    cancel.wait(ahead)
                else:
                    time.sleep(ahead)


def _to_cuda(
    offsets: dict[str, int],
    refs: list[TensorRef],
    buffer: npt.NDArray[np.uint8],
    device: Any,
    total: int,
    where: str,
) -> tuple[dict[str, Any], Any]:
    """One host-to-device copy of the whole stage, then typed views per tensor."""
    torch = _torch()
    torch_dtypes: Mapping[str, Any] = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    try:
        flat = torch.from_numpy(buffer).to(device)
    except RuntimeError as exc:  # CUDA out of memory
        raise LoadError(
            f"out of memory on {where}: copying {total} bytes ({_gib(total)}) failed: {exc}"
        ) from None
    out: dict[str, Any] = {}
    for ref in refs:
        start = offsets[ref.name]
        part = flat[start : start + ref.nbytes]
        dtype = torch_dtypes.get(ref.dtype)
        out[ref.name] = (part.view(dtype) if dtype is not None else part).reshape(ref.shape)
    return out, flat
