"""torch_device: the torch backend's ms/token for SmolLM2 on this machine's GPU (CPU where there
is none), beside what the planner predicts for that device, before and after calibration.

Why: the planner's step times are datasheet arithmetic until a stage really runs on the device.
A session with a lent GPU runs this one command and gets the figure the issue asks for
(measured vs predicted ms/token on CUDA); without a GPU it runs the same code on the CPU
(torch-cpu, numpy beside it as the floor), so it is known to work before a GPU is lent.

What it does: loads SmolLM2-135M (the packaged GGUF, dequantised to fp32) as one stage on the
device (``agents.executor_torch.TorchStage``), prefills each prompt, then times decode steps at
batch 1 and 4 (``torch.cuda.synchronize`` inside: the stage returns host arrays). The
prediction is the planner's ``max(read / bandwidth, FLOPs / compute)`` (``planner.schedule``)
with the device's figures from the known-GPU table (``planner.fleet.peak_bandwidth``, by the
name torch reports; on the CPU, this host's copy bandwidth as ``agents.cpu`` measures it),
then again with the figures the projector would calibrate from these steps
(``projector.calibration``). Expect eager fp32 torch on a big GPU to be launch-bound (hundreds
of small kernels per token), far above a bandwidth-only prediction: that gap is the figure.

Run: ``shardplane bench torch_device [--quick] [-- --tokens 32 --batches 1,4]``; needs torch
(``make install`` adds the CPU wheel where it is on disk).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from shardplane.agents.executor import Entry, StageBackend
from shardplane.agents.gguf import load_packaged_stage, packaged_tokenizer
from shardplane.agents.loader import StageSpec
from shardplane.agents.steptiming import step_flops
from shardplane.bench._pipeline_model import MODEL, reports
from shardplane.bus.messages import DeviceSample, DeviceState
from shardplane.planner import schedule
from shardplane.planner.catalog import resolve
from shardplane.planner.fleet import peak_bandwidth, peak_tflops
from shardplane.projector.calibration import calibrate
from shardplane.render import table

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time", "Hello")


def decode_ms(stage: StageBackend, prompts: list[list[int]], tokens: int) -> list[float]:
    """Per-step wall ms of ``tokens`` greedy decode steps of ``prompts`` together."""
    seqs = [f"d{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    last = [int(np.argmax(stage.forward([Entry(s, 0, len(p))], np.array(p))[0])) for s, p in zip(seqs, prompts, strict=True)]  # fmt: skip
    pos = [len(p) for p in prompts]
    out: list[float] = []
    for _ in range(tokens):
        entries = [Entry(s, q, 1) for s, q in zip(seqs, pos, strict=True)]
        started = time.perf_counter()
        logits = stage.forward(entries, np.array(last))  # returns host arrays: synchronised
        out.append((time.perf_counter() - started) * 1000)
        last = [int(np.argmax(row)) for row in logits]
        pos = [q + 1 for q in pos]
    for s in seqs:
        stage.release(s)
    return out


def device_figures(device: str) -> tuple[DeviceState, str]:
    """The device as the planner would see it: GPU by the name torch reports, else this host."""
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        sample = DeviceSample(node="lent", index=0, uuid="G", seq=1, ts=0.0, name=name, vendor="nvidia")  # fmt: skip
    else:
        from shardplane.agents.cpu import measure_copy_bandwidth_gbps

        name = "host CPU"
        sample = DeviceSample(
            node="lent", index=0, uuid="C", seq=1, ts=0.0, name=name, vendor="cpu",
            bandwidth_gbps=measure_copy_bandwidth_gbps(),
        )  # fmt: skip
    return DeviceState(sample=sample, online=True, last_seen=0.0), name


def predicted(batch: int, gbps: float, tflops: float, context: int) -> float:
    profile = resolve(MODEL)
    read = sum(profile.read_bytes(batch)) + profile.end_bytes(False, True)
    flops = batch * (sum(profile.layer_flops_per_token(context)) + profile.head_flops_per_token)
    return schedule.stage_ms(read, flops, gbps, tflops)


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench torch_device", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=None, help="decode steps (32, quick 9)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:0 if any)")
    args = parser.parse_args([a for a in (argv or []) if a != "--"])
    tokens: int = args.tokens or (9 if quick or args.quick else 32)
    batches = [int(b) for b in args.batches.split(",")]
    try:
        import torch
    except ImportError:
        print(json.dumps({"error": "torch is not installed: pip install 'shardplane[torch]'"}))
        return 2
    device: str = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    return run(device, tokens, batches)


def run(device: str, tokens: int, batches: list[int]) -> int:
    from shardplane.agents.backends import build_stage
    from shardplane.agents.executor_torch import TorchStage

    config, shard = load_packaged_stage(MODEL, StageSpec(0, 30, True, True))
    tok = packaged_tokenizer(MODEL)
    prompts = [tok.encode(p) for p in PROMPTS]
    whole: dict[str, Any] = {"layer_start": 0, "layer_end": 30, "embeddings": True, "head": True}
    stages: dict[str, StageBackend] = {
        "torch": TorchStage.build(config, shard.tensors, device=device, **whole)
    }
    stages["numpy"] = build_stage(config, shard.tensors, backend="numpy", **whole)
    state, name = device_figures(device)
    peak, source = peak_bandwidth(state)
    gbps, tflops = peak or 0.0, peak_tflops(state)
    context = round(statistics.mean(len(p) for p in prompts) + tokens / 2)
    measured: dict[tuple[str, int], list[float]] = {}
    for kind, stage in stages.items():
        decode_ms(stage, prompts[:1], 3)  # warm-up (CUDA context, allocator, caches)
        for b in batches:
            measured[(kind, b)] = decode_ms(stage, prompts[:b], tokens)
    torch_stage = stages["torch"]
    calibrated = state
    for b in batches:
        flops = step_flops(torch_stage, [Entry("x", context, 1)] * b)
        steps = measured[("torch", b)]
        for status in reports(
            steps, torch_stage.read_bytes(), b, flops, torch_stage.name, "lent/0"
        ):
            calibrated = calibrate(calibrated, status)
    return report(device, name, source, gbps, tflops, calibrated, measured, batches, context)


def report(
    device: str,
    name: str,
    source: str,
    gbps: float,
    tflops: float,
    calibrated: DeviceState,
    measured: dict[tuple[str, int], list[float]],
    batches: list[int],
    context: int,
) -> int:
    cal_gbps = calibrated.measured_gbps or gbps
    cal_tflops = calibrated.measured_tflops or tflops
    rows: list[tuple[str, ...]] = []
    figures: dict[str, Any] = {"device": device, "device_name": name, "figures_from": source}
    for (kind, b), ms in measured.items():
        p50 = statistics.median(ms)
        pred = predicted(b, gbps, tflops, context) if kind == "torch" else None
        after = predicted(b, cal_gbps, cal_tflops, context) if kind == "torch" else None
        rows.append(
            (kind, str(b), f"{p50:.3f}", f"{1000 * b / p50:.1f}",
             "" if pred is None else f"{pred:.3f}", "" if pred is None else f"{pred / p50:.3f}",
             "" if after is None else f"{after / p50:.3f}")
        )  # fmt: skip
        figures[f"{kind}_ms_per_step_b{b}"] = round(p50, 4)
        if pred is not None and after is not None:
            figures[f"predicted_ms_b{b}"] = round(pred, 4)
            figures[f"predicted_over_measured_b{b}"] = round(pred / p50, 4)
            figures[f"calibrated_predicted_over_measured_b{b}"] = round(after / p50, 4)
    headers = ("backend", "batch", "ms/step", "tok/s", "predicted", "pred/meas", "after calib.")
    print(table(headers, rows))
    print(
        f"{device} ({name}): planner figures {gbps:.0f} GB/s, {tflops:.1f} TFLOPS ({source}); "
        f"calibrated from these steps {cal_gbps:.1f} GB/s, {cal_tflops:.3f} TFLOPS"
    )
    figures.update(
        planner_gbps=round(gbps, 2),
        planner_tflops=round(tflops, 3),
        calibrated_gbps=round(cal_gbps, 3),
        calibrated_tflops=round(cal_tflops, 4),
        context=context,
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(argv=sys.argv[1:]))
