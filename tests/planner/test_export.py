"""Exports: vLLM's partition string and llama.cpp's split, checked against llama.cpp's rule."""

from __future__ import annotations

import random

import pytest

from shardplane.bus.messages import PlacementReply, Stage
from shardplane.planner.export import (
    export_plan,
    llamacpp_layers,
    llamacpp_tensor_split,
    vllm_partition,
)


def _reply(counts: list[int], nodes: list[str]) -> PlacementReply:
    stages = []
    start = 0
    for i, (c, node) in enumerate(zip(counts, nodes, strict=True)):
        stages.append(
            Stage(
                node=node,
                device=f"{node}/{i % 2}",
                gpu="NVIDIA A100-SXM4-80GB" if i else "AMD Instinct MI250X",
                layer_start=start,
                layer_end=start + c,
                weight_bytes=1,
                kv_bytes=1,
                bandwidth_gbps=1.0,
                stage_ms=1.0,
                hop_ms=0.0,
            )
        )
        start += c
    return PlacementReply(
        ok=True, instance_id="x", generation=1, model="llama-3.1-70b", stages=tuple(stages)
    )


def test_vllm_partition_is_counts_in_rank_order() -> None:
    reply = _reply([24, 40, 16], ["a", "a", "b"])
    assert vllm_partition(reply) == "24,40,16"
    out = export_plan(reply, "vllm")
    assert 'VLLM_PP_LAYER_PARTITION="24,40,16"' in out and "--pipeline-parallel-size 3" in out


@pytest.mark.parametrize("seed", range(30))
def test_llamacpp_split_lands_exact_counts(seed: int) -> None:
    rng = random.Random(seed)
    k = rng.randint(1, 8)
    counts = [rng.randint(1, 30) for _ in range(k)]
    split = llamacpp_tensor_split(counts)
    assert llamacpp_layers(split, sum(counts)) == counts


def test_llamacpp_command() -> None:
    out = export_plan(_reply([30, 50], ["a", "b"]), "llamacpp")
    assert "-ngl 81" in out and "-ts 29.5,51.5" in out
    assert "--device ROCm0,RPC[b:50053]" in out and "--rpc b:50053" in out
    assert "rpc-server -H 0.0.0.0 -p 50053 -d CUDA1" in out


def test_failed_reply_exports_the_reason() -> None:
    from shardplane.bus.messages import ErrorInfo

    bad = PlacementReply(
        ok=False, error=ErrorInfo(code="insufficient_memory", message="short by 3.1 GiB")
    )
    assert "short by 3.1 GiB" in export_plan(bad, "vllm")
    with pytest.raises(ValueError, match="unknown export kind"):
        export_plan(_reply([1], ["a"]), "tgi")


def test_exports_say_which_schedule_they_were_planned_for() -> None:
    """llama.cpp runs M = 1, vLLM one micro-batch per rank; the comment lines say so, with the
    step time, and warn when the plan was scored with another M."""
    from msgspec.structs import replace

    reply = replace(_reply([30, 50], ["a", "b"]), batch=8, microbatches=1, step_ms=20.0)
    lcpp = export_plan(reply, "llamacpp")
    assert "one batch through the pipeline at a time (M = 1)" in lcpp
    assert "step 20.00 ms per token per sequence" in lcpp and "warning" not in lcpp
    vllm = export_plan(reply, "vllm")
    assert "one micro-batch per pipeline rank" in vllm
    assert "warning: planned with M = 1 but this engine runs M = 2" in vllm
    ok = export_plan(replace(reply, microbatches=2), "vllm")
    assert "warning" not in ok


def test_place_export_asks_for_the_engines_schedule() -> None:
    import argparse

    from shardplane.commands import _request_from_args  # pyright: ignore[reportPrivateUsage]
    from shardplane.planner.schedule import engine_microbatches

    base = dict(
        model="llama-3.1-8b",
        context_tokens=8192,
        batch=8,
        objective="throughput",
        dry_run=True,
        memory_headroom=0.1,
        exclude_nodes=[],
        max_stages=None,
        microbatches="auto",
        min_stages=None,
        instance_id=None,
    )
    for kind, want in (("llamacpp", 1), ("vllm", "stages"), (None, "auto")):
        body = _request_from_args(argparse.Namespace(**base, export=kind))
        assert body["microbatches"] == want
        if kind:
            assert engine_microbatches(kind) == want
    body = _request_from_args(argparse.Namespace(**{**base, "microbatches": "3"}, export=None))
    assert body["microbatches"] == 3


def test_place_prints_the_schedule_not_the_bottleneck_rate() -> None:
    from msgspec.structs import replace

    from shardplane import render

    reply = replace(
        _reply([30, 50], ["a", "b"]),
        batch=8,
        microbatches=2,
        step_ms=9.0,
        tokens_per_s=888.9,
        bottleneck_ms=4.5,
        max_batch=37,
        context_tokens=4096,
    )
    text = render.placement(reply)
    assert "step 9.00 ms per token per sequence -> 888.9 tokens/s at batch 8" in text
    assert "2 micro-batches of 4" in text and "up to 37 sequences at 4096 tokens" in text
    assert "bottleneck" not in text
