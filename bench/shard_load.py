"""shard-load: how fast the worker's loader gets a checkpoint's stages into memory, against the
raw read throughput of the same bytes from the same files, measured in the same run.

A synthetic Llama-format checkpoint (sharded safetensors + index, layers of unequal size) is
written to a temporary directory and split into pipeline stages. For each cache condition both
sides read exactly the same byte ranges (every tensor of every stage) from the same files:

- raw read: ``preadv`` in 64 MiB chunks into one reused buffer, i.e. the bytes are read and
  dropped (what ``dd of=/dev/null`` measures), the most favourable floor for the baseline;
- load: ``agents.loader.load_stage`` per stage (positional reads by default, ``--read-mode mmap``
  for a memory map, into a fresh host buffer that it keeps, bytes checked against the headers),
  the stage released after timing.

Warm: the files were read once before, so every page is in the page cache for both sides
(the headline ``load_gbps``/``raw_read_gbps``/``ratio``). Cold: the files' pages are evicted
with ``posix_fadvise(DONTNEED)`` before each side, so both read from the device (reported too,
``--no-cold`` to skip). Each figure is the median of ``--repeat`` alternating runs.

Loads run on primed host memory (see ``prime_memory``: in a VM, memory idle for a few seconds
costs a host fault per page on first touch; both touch rates are printed). One more warm round
runs without priming, each load after ``--idle-s`` of idling, as a worker that was idle finds its
memory: ``unprimed_load_gbps`` / ``unprimed_ratio``, so the cost of skipping the workaround is
in the same output.

Run: ``shardplane bench shard-load [--quick] [-- --size-gib 4 --stages 4 --dir /tmp]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import psutil
from safetensors.numpy import save_file  # pyright: ignore[reportUnknownVariableType]

from shardplane.agents.loader import (
    DEFAULT_READ_MODE,
    Checkpoint,
    ReadMode,
    StageSpec,
    default_copy_threads,
    host_buffer,
    load_stage,
)
from shardplane.bus.checkpoint import TensorInfo
from shardplane.render import table

CHUNK = 64 * 1024 * 1024
GB = 1e9


def synthetic_checkpoint(root: Path, *, size_bytes: int, files: int) -> int:
    """Write a Llama-shaped fp16 checkpoint of about ``size_bytes``; returns its layer count.

    Layers differ in MLP width (+-25 %), so stages of equal layer count differ in bytes. Files
    are written one at a time, so memory use stays near one file's size."""
    # Llama-7B-like widths for multi-GB runs; half as wide for a quick run so it still has layers.
    hidden, vocab = (2048, 32000) if size_bytes >= 2 * 2**30 else (1024, 16000)
    base_inter = hidden * 11 // 4
    layer_of = [base_inter * (3 + (i * 7) % 4) // 4 for i in range(512)]  # 0.75x .. 1.5x

    def layer_bytes(inter: int) -> int:
        return 2 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)

    ends = 2 * 2 * vocab * hidden + 2 * hidden
    layers = 1
    while ends + sum(layer_bytes(layer_of[i]) for i in range(layers + 1)) <= size_bytes:
        layers += 1
    per_file = -(-layers // files)
    weight_map: dict[str, str] = {}
    root.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        part: dict[str, npt.NDArray[np.float16]] = {}
        if k == 0:
            part["model.embed_tokens.weight"] = np.full((vocab, hidden), 0.5, np.float16)
        for i in range(k * per_file, min(layers, (k + 1) * per_file)):
            inter = layer_of[i]
            p = f"model.layers.{i}."
            part[p + "input_layernorm.weight"] = np.ones(hidden, np.float16)
            part[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float16)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                part[p + f"self_attn.{name}.weight"] = np.full((hidden, hidden), i, np.float16)
            part[p + "mlp.gate_proj.weight"] = np.full((inter, hidden), 1, np.float16)
            part[p + "mlp.up_proj.weight"] = np.full((inter, hidden), 2, np.float16)
            part[p + "mlp.down_proj.weight"] = np.full((hidden, inter), 3, np.float16)
        if k == files - 1:
            part["model.norm.weight"] = np.ones(hidden, np.float16)
            part["lm_head.weight"] = np.full((vocab, hidden), 0.25, np.float16)
        if not part:
            continue
        file = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        save_file(part, str(root / file))
        weight_map.update(dict.fromkeys(part, file))
        del part
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "num_hidden_layers": layers,
                "hidden_size": hidden,
                "intermediate_size": base_inter,
                "num_attention_heads": 16,
                "num_key_value_heads": 16,
                "vocab_size": vocab,
                "tie_word_embeddings": False,
                "dtype": "float16",
            }
        )
    )
    return layers


def split(ckpt: Checkpoint, stages: int) -> list[StageSpec]:
    """Contiguous layer ranges of about equal bytes (the planner's job; good enough here)."""
    layers = ckpt.config.layers
    sizes = [sum(r.nbytes for r in ckpt.refs(StageSpec(i, i + 1))) for i in range(layers)]
    target = sum(sizes) / stages
    bounds = [0]
    acc = 0
    for i, size in enumerate(sizes):
        acc += size
        if acc >= target * len(bounds) and len(bounds) < stages and i + 1 < layers:
            bounds.append(i + 1)
    bounds.append(layers)
    return [
        StageSpec(a, b, embeddings=a == 0, head=b == layers) for a, b in itertools.pairwise(bounds)
    ]


def raw_read(root: Path, refs: list[TensorInfo], buffer: npt.NDArray[np.uint8]) -> int:
    """Read exactly these tensors' bytes with plain ``preadv``; returns the bytes read.

    The destination walks through the whole 64 MiB buffer instead of restarting at its head for
    each tensor, so small tensors do not land in a cache-hot spot the loader never gets."""
    view = buffer.data
    size = len(buffer)
    at = 0
    total = 0
    by_file: dict[str, list[TensorInfo]] = {}
    for ref in refs:
        by_file.setdefault(ref.file, []).append(ref)
    for file, group in by_file.items():
        fd = os.open(root / file, os.O_RDONLY)
        try:
            for ref in sorted(group, key=lambda r: r.begin):
                pos, end = ref.begin, ref.end
                while pos < end:
                    if at == size:
                        at = 0
                    n = os.preadv(fd, [view[at : at + min(size - at, end - pos)]], pos)
                    if n <= 0:
                        raise OSError(f"short read in {file} at byte {pos}")
                    pos += n
                    at += n
                    total += n
        finally:
            os.close(fd)
    return total


def evict(root: Path) -> None:
    """Drop the checkpoint's pages from the page cache (clean pages; no root needed)."""
    for path in root.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prime_memory(nbytes: int) -> float:
    """Touch and free ``nbytes`` of host memory; returns the touch rate in GB/s.

    Why: in a VM with free-page reporting (virtio-balloon, as on the machines this runs on),
    memory the guest freed a few seconds ago was handed back to the host, and touching it again
    costs a host fault per page: measured here about 0.5 GB/s against about 5 GB/s for memory
    reused at once. A bare-metal host has no such cost. The loader must fill fresh memory that it
    keeps, while the raw read reuses one small buffer, so without priming the ratio would measure
    the hypervisor. Priming right before each timed load puts the guest's free memory in the
    state bare metal is always in; it is reported in the output, as is the unprimed touch rate.
    """
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    t0 = time.perf_counter()
    pages = np.frombuffer(region, dtype=np.uint8)
    pages[::4096] = 1
    dt = time.perf_counter() - t0
    del pages
    region.close()
    return nbytes / dt / GB


def measure(
    root: Path,
    specs: list[StageSpec],
    stage_refs: list[list[TensorInfo]],
    cold: bool,
    threads: int,
    mode: ReadMode = DEFAULT_READ_MODE,
    *,
    prime: bool = True,
    idle_s: float = 0.0,
) -> tuple[float, float, float, list[float]]:
    """(raw seconds, fresh-memory raw seconds, load seconds, per-stage load GB/s) for one round
    under one cache state.

    Raw read and load alternate stage by stage, so on a shared, noisy machine both sides see
    the same moments. ``prime=False``: no priming and no fresh-memory raw read (0 s); each stage
    starts after ``idle_s`` of sleep, so the load meets host memory as an idle worker would."""
    buffer = np.empty(CHUNK, dtype=np.uint8)
    buffer.fill(0)  # fault the buffer in before timing
    raw_s = 0.0
    fresh_s = 0.0
    load_s = 0.0
    per_stage: list[float] = []
    for spec, refs in zip(specs, stage_refs, strict=True):
        expected = sum(r.nbytes for r in refs)
        if idle_s:
            time.sleep(idle_s)
        if cold:
            evict(root)
        t0 = time.perf_counter()
        got = raw_read(root, refs, buffer)
        raw_s += time.perf_counter() - t0
        assert got == expected
        if prime:
            # The same read into fresh memory kept for the stage, as the loader must: the
            # baseline with the loader's memory obligation (reported next to the strict one).
            if cold:
                evict(root)
            prime_memory(expected)
            fresh = host_buffer(expected)
            t0 = time.perf_counter()
            raw_read(root, refs, fresh)
            fresh_s += time.perf_counter() - t0
            del fresh
            prime_memory(expected)
        if cold:
            evict(root)
        t0 = time.perf_counter()
        shard = load_stage(
            root,
            spec,
            expected_bytes=expected,
            use_cuda=False,
            copy_threads=threads,
            read_mode=mode,
        )
        dt = time.perf_counter() - t0
        assert shard.nbytes == expected
        shard.release()
        del shard
        load_s += dt
        per_stage.append(expected / dt / GB)
    return raw_s, fresh_s, load_s, per_stage


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench shard-load", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small checkpoint (0.5 GiB)")
    parser.add_argument("--size-gib", type=float, default=None, help="default 4, quick 0.5")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--files", type=int, default=None, help="default 8, quick 2")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    parser.add_argument("--copy-threads", type=int, default=None, help="loader threads")
    parser.add_argument("--read-mode", choices=["pread", "mmap"], default=DEFAULT_READ_MODE)
    parser.add_argument(
        "--idle-s",
        type=float,
        default=3.0,
        help="idle time before the first-touch probe and before each unprimed load",
    )
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache rounds")
    args = parser.parse_args([a for a in (argv or []) if a != "--"])
    quick = quick or args.quick
    size = int((args.size_gib or (0.5 if quick else 4.0)) * 2**30)
    files: int = args.files or (2 if quick else 8)
    threads: int = args.copy_threads or default_copy_threads()

    base = Path(tempfile.mkdtemp(prefix="shard-load-", dir=args.dir))
    free_disk = shutil.disk_usage(base).free
    available = int(psutil.virtual_memory().available)
    if free_disk < size * 1.2 + 2**30:
        print(
            f"not enough disk in {base}: need {size * 1.2 / GB:.1f} GB, {free_disk / GB:.1f} GB free"
        )
        shutil.rmtree(base, ignore_errors=True)
        return 2
    try:
        root = base / "ckpt"
        t0 = time.perf_counter()
        layers = synthetic_checkpoint(root, size_bytes=size, files=files)
        write_s = time.perf_counter() - t0
        ckpt = Checkpoint.open(root)
        specs = split(ckpt, args.stages)
        stage_refs = [ckpt.refs(s) for s in specs]
        total = sum(r.nbytes for refs in stage_refs for r in refs)
        largest = max(sum(r.nbytes for r in refs) for refs in stage_refs)
        if largest * 1.5 > available:
            print(
                f"not enough memory: the largest stage is {largest / GB:.1f} GB, {available / GB:.1f} GB available"
            )
            return 2
        warm_cache = total * 1.2 + largest < available
        print(
            f"checkpoint: {total / GB:.2f} GB, {layers} layers, {files} files "
            f"(written in {write_s:.1f} s); {len(specs)} stages; page cache can hold it: "
            f"{warm_cache}; loader copy threads: {threads} of {os.cpu_count()} CPUs"
        )

        # The VM's first-touch cost of memory idle for a while vs memory reused at once.
        probe = min(largest, 2**30)
        time.sleep(args.idle_s)
        idle_touch = prime_memory(probe)
        reused_touch = prime_memory(probe)
        print(
            f"host memory first touch: {idle_touch:.2f} GB/s after {args.idle_s:g} s idle, "
            f"{reused_touch:.2f} GB/s reused at once (loads run on primed memory but for one round)"
        )

        conditions: list[tuple[str, bool]] = [("warm", False)]
        if not args.no_cold:
            conditions.append(("cold", True))
        results: dict[str, tuple[float, float, float, float, float]] = {}
        stage_rows: list[list[object]] = []
        unprimed = (0.0, 0.0, 0.0)  # raw GB/s, load GB/s, ratio
        for name, cold in conditions:
            if not cold:  # first read fills the page cache, so both sides then start warm
                measure(root, specs, stage_refs, False, threads, args.read_mode)
            # Cold rounds read from the device: fewer of them keep a full run short.
            repeat = min(args.repeat, 3) if cold else args.repeat
            rounds = [
                measure(root, specs, stage_refs, cold, threads, args.read_mode)
                for _ in range(repeat)
            ]
            raw_gbps = statistics.median(total / r[0] / GB for r in rounds)
            fresh_gbps = statistics.median(total / r[1] / GB for r in rounds)
            load_gbps = statistics.median(total / r[2] / GB for r in rounds)
            # The ratio is taken per round (both sides measured at the same moments), then the
            # median: steadier than a ratio of medians on a shared machine.
            ratio = statistics.median(r[0] / r[2] for r in rounds)
            ratio_fresh = statistics.median(r[1] / r[2] for r in rounds)
            per_stage = [statistics.median(r[3][i] for r in rounds) for i in range(len(specs))]
            results[name] = (raw_gbps, load_gbps, ratio, fresh_gbps, ratio_fresh)
            if name == "warm":
                # One more warm round (before the cold ones evict the files), without priming,
                # each load after idling (see the module docstring).
                raw_s, _, load_s, _ = measure(
                    root, specs, stage_refs, False, threads, args.read_mode,
                    prime=False, idle_s=args.idle_s,
                )  # fmt: skip
                unprimed = (total / raw_s / GB, total / load_s / GB, raw_s / load_s)
                stage_rows = [
                    [
                        i,
                        f"{s.layer_start}-{s.layer_end - 1}",
                        ("emb " if s.embeddings else "") + ("head" if s.head else ""),
                        f"{sum(r.nbytes for r in refs) / GB:.3f}",
                        len(refs),
                        f"{per_stage[i]:.2f}",
                    ]
                    for i, (s, refs) in enumerate(zip(specs, stage_refs, strict=True))
                ]
        print()
        print(table(["stage", "layers", "ends", "GB", "tensors", "warm load GB/s"], stage_rows))
        print()
        rows: list[list[object]] = []
        for name, (raw_gbps, load_gbps, ratio, fresh_gbps, ratio_fresh) in results.items():
            rows.append(
                [
                    name,
                    f"{raw_gbps:.2f}",
                    f"{fresh_gbps:.2f}",
                    f"{load_gbps:.2f}",
                    f"{ratio:.2f}",
                    f"{ratio_fresh:.2f}",
                ]
            )
        rows.insert(
            1,
            [
                f"warm, unprimed ({args.idle_s:g} s idle)",
                f"{unprimed[0]:.2f}",
                "-",
                f"{unprimed[1]:.2f}",
                f"{unprimed[2]:.2f}",
                "-",
            ],
        )
        print(
            table(
                [
                    "page cache",
                    "raw read GB/s",
                    "raw into kept memory",
                    "load GB/s",
                    "load / raw",
                    "load / raw kept",
                ],
                rows,
            )
        )
        print(
            f"\nmedians of {args.repeat} rounds (cold: {min(args.repeat, 3)}), raw read and load "
            "alternating stage by stage; load / raw is the median of the per-round ratios.\n"
            "memory is primed before each load (prime_memory) except in the unprimed row: one "
            f"round, each load after {args.idle_s:g} s idle, as an idle worker meets its memory.\n"
            "raw read = preadv of the same tensor bytes into one reused 64 MiB buffer; raw into "
            "kept memory = the same preadv into a fresh buffer of the stage's size (what the loader "
            "must fill and keep).\ntarget: load / raw >= 0.80 (warm)"
        )
        raw_gbps, load_gbps, ratio, fresh_gbps, ratio_fresh = results["warm"]
        figures: dict[str, object] = {
            "load_gbps": round(load_gbps, 3),
            "raw_read_gbps": round(raw_gbps, 3),
            "ratio": round(ratio, 3),
            "cache": "warm",
            "raw_read_kept_gbps": round(fresh_gbps, 3),
            "ratio_vs_kept": round(ratio_fresh, 3),
            "bytes": total,
            "stages": len(specs),
            "files": files,
            "copy_threads": threads,
            "read_mode": args.read_mode,
            "memory_primed": True,
            "unprimed_load_gbps": round(unprimed[1], 3),
            "unprimed_raw_read_gbps": round(unprimed[0], 3),
            "unprimed_ratio": round(unprimed[2], 3),
            "unprimed_idle_s": args.idle_s,
            "idle_memory_touch_gbps": round(idle_touch, 3),
            "reused_memory_touch_gbps": round(reused_touch, 3),
        }
        if "cold" in results:
            c_raw, c_load, c_ratio, _, _ = results["cold"]
            figures |= {
                "cold_load_gbps": round(c_load, 3),
                "cold_raw_read_gbps": round(c_raw, 3),
                "cold_ratio": round(c_ratio, 3),
            }
        print(json.dumps(figures))
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)
