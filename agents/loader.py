"""Load one pipeline stage of a Hugging Face-format checkpoint (``config.json`` + safetensors).

Only the stage's tensors are read: ``model.layers.<i>.*`` for i in [layer_start, layer_end), plus
``model.embed_tokens.*`` on the first stage and ``model.norm.*`` + ``lm_head.*`` on the last (with
tied embeddings the head *is* ``model.embed_tokens.weight``). Headers come first (8-byte
little-endian length + JSON), so every size and offset is known and checked before a data byte is
touched; then each contiguous run of wanted bytes is read with positional reads straight into a
single host buffer (numpy), and moved to the GPU with torch when CUDA is available (optional
extra). ``read_mode="mmap"`` maps each run and copies out of the mapping instead; it is not the
default because a file truncated under a mapping raises SIGBUS and kills the agent, where a read
just comes up short (see ``load_stage``). Large runs are read by a few threads, which overlaps
the page faults and copies that make up most of a host load.

How fast, and why not faster: on this kind of VM a host load is bounded by faulting in fresh
memory (the copy must land somewhere the worker keeps), which a raw read into a reused buffer
never pays; ``shardplane bench shard-load`` prints both baselines.

Errors are ``LoadError`` with a message that names the file, tensor, layer and numbers, because
that message travels to the operator verbatim in ``ShardStatus.reason``.

Headers, index and config are read by ``bus.checkpoint``, the same code the planner uses for
the plan's per-stage ``weight_bytes``; the loader refuses to load a stage unless its bytes equal
that figure exactly (``check_plan_bytes``).
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from shardplane.agents.stage import (
    Checkpoint,
    Config,
    LoadCancelled,
    LoadError,
    StageSpec,
    checkpoint_dir,
    stage_bytes,
    stage_tensor_names,
)
from shardplane.bus.checkpoint import (
    TensorInfo,
    layer_of,
)

# What moved to agents/stage.py is still importable from here, where callers have known it.
__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_READ_MODE",
    "Checkpoint",
    "Config",
    "LoadCancelled",
    "LoadError",
    "LoadedShard",
    "ReadMode",
    "StageSpec",
    "checkpoint_dir",
    "default_copy_threads",
    "host_buffer",
    "load_stage",
    "stage_bytes",
    "stage_tensor_names",
]

CHUNK_BYTES = 64 * 1024 * 1024  # copy granularity: cancellation and rate-limit checkpoints
PARALLEL_CHUNK = 16 * 1024 * 1024  # per-thread chunk when copying with several threads
PAGE = mmap.ALLOCATIONGRANULARITY

# safetensors dtype -> numpy dtype that holds the raw bytes. Types numpy lacks (bf16, fp8) are
# held bit-exact as same-width unsigned ints; torch views them properly. Packed sub-byte types
# (F4) have no element view: they are held as their raw bytes.
NUMPY_DTYPES: dict[str, str] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "F8_E4M3": "u1",
    "F8_E5M2": "u1",
    "F8_E8M0": "u1",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}

ReadMode = Literal["mmap", "pread"]
DEFAULT_READ_MODE: ReadMode = "pread"


# --- loading ----------------------------------------------------------------------------------


def describe(spec: StageSpec) -> str:
    return (
        f"layers [{spec.layer_start}, {spec.layer_end})"
        + (" + embeddings" if spec.embeddings else "")
        + (" + norm/head" if spec.head else "")
    )


def check_plan_bytes(refs: list[TensorInfo], spec: StageSpec, expected: int | None) -> None:
    """Fail unless the plan's weight_bytes is exactly the bytes the stage holds.

    The plan counts what the stage loads: its layers, the embeddings on the first stage, the
    final norm and head on the last, a tied matrix once (planner.cost.Tables.weights, from the
    same headers). Any difference means the files changed since the plan, or plan and loader
    disagree on what the stage holds, and loading it would be reporting a lie.
    """
    if expected is None:
        return
    total = sum(r.nbytes for r in refs)
    if expected == total:
        return
    layer_bytes = sum(r.nbytes for r in refs if layer_of(r.name) is not None)
    extra = total - layer_bytes
    raise LoadError(
        f"byte mismatch: the headers give {total} bytes for {describe(spec)} "
        f"({layer_bytes} in layers"
        + (f", {extra} in embeddings/norm/head" if extra else "")
        + f", {len(refs)} tensors) but the plan says weight_bytes={expected} "
        f"({expected - total:+d})"
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


def _runs(refs: list[TensorInfo]) -> list[list[TensorInfo]]:
    """Group tensors into runs that are back to back in one file (one mapping per run)."""
    runs: list[list[TensorInfo]] = []
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
    read_mode: ReadMode = DEFAULT_READ_MODE,
) -> LoadedShard:
    """Read exactly the stage's tensors into memory. Blocking: call it in a thread.

    ``expected_bytes`` is the plan's weight_bytes; a mismatch fails before any data is read
    (the plan and the files disagree) and is checked again after the copy. ``memory_limit``
    caps the bytes this load may take (default: the host's available memory).
    ``read_limit_bps`` throttles the copy (operators use it so a load does not starve a serving
    process's I/O; tests use it to make a load last). ``cancel`` is polled between chunks.
    ``copy_threads`` copies with that many threads (default: up to 4, by CPU count).
    ``read_mode``: ``pread`` (default: positional reads straight into the stage buffer) or
    ``mmap`` (map each run of tensors, copy out of the mapping); both read only the stage's
    bytes. Why pread by default: a file truncated *during* the copy (after the size check) is a
    short read to pread, hence a LoadError and a ``failed`` status, but SIGBUS to a mapping, which
    kills the whole agent; pread was also faster from a cold page cache here.
    """
    started = time.perf_counter()
    ckpt = Checkpoint.open(root)
    refs = ckpt.refs(spec)
    total = sum(r.nbytes for r in refs)
    where_desc = describe(spec)
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
        start = offsets[ref.name]
        raw = buffer[start : start + ref.nbytes]
        view_as = NUMPY_DTYPES.get(ref.dtype)
        tensors[ref.name] = raw.view(view_as).reshape(ref.shape) if view_as is not None else raw
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
    run: list[TensorInfo],
    buffer: npt.NDArray[np.uint8],
    offsets: dict[str, int],
    copied: int,
    total: int,
    read_limit_bps: float | None,
    started: float,
    cancel: threading.Event | None,
    on_progress: Callable[[int, int], None] | None,
    pool: ThreadPoolExecutor | None = None,
    read_mode: ReadMode = DEFAULT_READ_MODE,
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
                f"file truncated: tensor {run[-1].name} in {path} ends at byte {end} "
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
                    if n <= 0:  # end of file: it shrank while being read
                        raise LoadError(_cut_short(path, run, begin + at, os.fstat(fd).st_size))
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


def _cut_short(path: Path, run: list[TensorInfo], at: int, size: int) -> str:
    inside = next((r for r in run if r.begin <= at < r.end), run[-1])
    return (
        f"file truncated while loading: {path} is now {size} bytes but the stage's tensors "
        f"in it run to byte {run[-1].end}; the read at byte {at} (tensor {inside.name}, "
        f"bytes [{inside.begin}, {inside.end})) came up short"
    )


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
        workers = pool._max_workers
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
    refs: list[TensorInfo],
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
