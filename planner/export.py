"""Print a plan for the engines people run (``shardplane place MODEL --export vllm|llamacpp``).

vLLM: ``VLLM_PP_LAYER_PARTITION`` is the comma-separated layer count of each pipeline rank in
rank order (vllm.distributed.utils.get_pp_indices); the count of entries must equal
``--pipeline-parallel-size`` and they must sum to ``num_hidden_layers``; the embeddings and
the head live on the first and last rank and are not counted. SGLang reads
``SGLANG_PP_LAYER_PARTITION`` in the same format.

llama.cpp (``-sm layer``, the default): ``-ts`` gives proportions in ``--device`` order,
normalised into cumulative fractions F_j; with ``-ngl`` >= L + 1, slot ``il`` (0..L, where slot
L is the output layer) goes to the first device whose F_j exceeds ``il / (L + 1)``
(llama-model.cpp: ``upper_bound(splits, il / act_gpu_layers)``). To land exactly ``c_j`` layers on
device j we place each boundary half a slot early: ``-ts c_0 - 0.5, c_1, ..., c_{k-1} + 1.5``,
which sums to L + 1 and puts the output layer on the last device. The input embeddings stay on
the CPU in llama.cpp whatever the split. Devices on other nodes are reached through
``rpc-server`` (``--rpc host:port``); check the names llama.cpp gives them with
``--list-devices`` (recent builds print them at start-up too).
"""

from __future__ import annotations

from shardplane.bus.messages import PlacementReply, Stage
from shardplane.planner.schedule import ENGINE_MICROBATCHES, engine_microbatches

RPC_BASE_PORT = 50052


def vllm_partition(reply: PlacementReply) -> str:
    return ",".join(str(s.layer_end - s.layer_start) for s in reply.stages)


def llamacpp_tensor_split(counts: list[int]) -> list[float]:
    """Proportions for ``-ts`` that make llama.cpp's rule give exactly ``counts`` (see module
    docstring); ``sum(counts)`` is the model's layer count."""
    if not counts:
        return []
    if len(counts) == 1:
        return [1.0]
    out = [float(c) for c in counts]
    out[0] -= 0.5
    out[-1] += 1.5
    return out


def llamacpp_layers(split: list[float], n_layer: int) -> list[int]:
    """llama.cpp's own assignment for ``-ts split`` and ``-ngl n_layer + 1``: layers per device
    (the output slot excluded). Used to verify :func:`llamacpp_tensor_split`."""
    total = sum(split)
    cumulative: list[float] = []
    acc = 0.0
    for x in split:
        acc += x
        cumulative.append(acc / total)
    counts = [0] * len(split)
    for il in range(n_layer):
        frac = il / (n_layer + 1)
        device = next((j for j, f in enumerate(cumulative) if f > frac), len(split) - 1)
        counts[device] += 1
    return counts


def _backend(stage: Stage) -> str:
    gpu = stage.gpu.lower()
    if "amd" in gpu or "instinct" in gpu or "radeon" in gpu:
        return "ROCm"
    if "apple" in gpu or gpu.startswith("m1") or gpu.startswith("m2"):
        return "Metal"
    return "CUDA"


def _fmt(x: float) -> str:
    return f"{x:g}"


def _schedule_comment(reply: PlacementReply, kind: str) -> str:
    """The schedule the plan was scored with, and the engine's own (see ENGINE_MICROBATCHES)."""
    m = reply.microbatches or 1
    why = {
        "llamacpp": "llama.cpp runs one batch through the pipeline at a time (M = 1)",
        "vllm": "vLLM keeps one micro-batch per pipeline rank in flight (M = stages)",
    }.get(kind, "")
    engine = engine_microbatches(kind) if kind in ENGINE_MICROBATCHES else None
    expected = (
        (engine if isinstance(engine, int) else min(reply.batch or 1, len(reply.stages)))
        if engine is not None
        else m
    )
    warn = (
        ""
        if expected == m
        else f"\n# warning: planned with M = {m} but this engine runs M = {expected}; re-plan "
        "with `shardplane place ... --export` to score its schedule"
    )
    plural = "es" if m != 1 else ""
    return (
        f"# schedule: {why}; planned for batch {reply.batch} as {m} micro-batch{plural}: step "
        f"{reply.step_ms:.2f} ms per token per sequence, {reply.tokens_per_s:.1f} tokens/s{warn}"
    )


def export_plan(reply: PlacementReply, kind: str) -> str:
    """The plan as shell lines for ``kind`` ("vllm" or "llamacpp"); a failed reply says why."""
    if not reply.ok or not reply.stages:
        err = reply.error
        return f"# no plan: {err.code + ': ' + err.message if err else 'empty reply'}"
    layers = reply.stages[-1].layer_end
    head = (
        f"# {reply.model}: {len(reply.stages)} stages, {layers} layers, instance "
        f"{reply.instance_id} generation {reply.generation}\n{_schedule_comment(reply, kind)}"
    )
    if kind == "vllm":
        ranks = "\n".join(
            f"#   rank {i}: {s.device} ({s.gpu}) layers {s.layer_start}-{s.layer_end - 1}"
            for i, s in enumerate(reply.stages)
        )
        return (
            f"{head}\n{ranks}\n"
            f'export VLLM_PP_LAYER_PARTITION="{vllm_partition(reply)}"\n'
            f"# start one Ray worker per rank on its node, in the order above, then:\n"
            f"vllm serve <model> --pipeline-parallel-size {len(reply.stages)} --tensor-parallel-size 1"
        )
    if kind == "llamacpp":
        main_node = reply.stages[0].node
        devices: list[str] = []
        rpc: list[str] = []
        remote: list[str] = []
        for i, s in enumerate(reply.stages):
            index = s.device.rsplit("/", 1)[1]
            local = f"{_backend(s)}{index}"
            if s.node == main_node:
                devices.append(local)
            else:
                port = RPC_BASE_PORT + i
                endpoint = f"{s.node}:{port}"
                rpc.append(endpoint)
                devices.append(f"RPC[{endpoint}]")
                remote.append(f"#   on {s.node}: rpc-server -H 0.0.0.0 -p {port} -d {local}")
        counts = [s.layer_end - s.layer_start for s in reply.stages]
        split = ",".join(_fmt(x) for x in llamacpp_tensor_split(counts))
        lines = [head, f"# layer counts in --device order: {','.join(map(str, counts))}"]
        if remote:
            lines += ["# remote devices through rpc-server (names: check --list-devices):", *remote]
        rpc_flag = f" --rpc {','.join(rpc)}" if rpc else ""
        lines.append(
            f"llama-server -m <model.gguf> -sm layer -ngl {layers + 1} --device {','.join(devices)} "
            f"-ts {split}{rpc_flag}"
        )
        return "\n".join(lines)
    raise ValueError(f"unknown export kind {kind!r}; use 'vllm' or 'llamacpp'")
