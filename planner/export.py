"""Print a plan as commands for the engines people run (``shardplane place MODEL --export
vllm|llamacpp``), checked against what those engines' own parsers and rank rules do, so the
printed lines land each layer on the GPU the plan chose.

llama.cpp (``-sm layer``): ``-ts`` gives proportions in ``--device`` order, normalised into
cumulative fractions F_j; with ``-ngl`` >= L + 1, slot ``il`` (0..L, where slot L is the output
layer) goes to the first device whose F_j exceeds ``il / (L + 1)`` (llama-model.cpp:
``upper_bound(splits, il / act_gpu_layers)``). To land exactly ``c_j`` layers on device j we
place each boundary half a slot early: ``-ts c_0 - 0.5, c_1, ..., c_{k-1} + 1.5``, which sums to
L + 1 and puts the output layer on the last device. Remote GPUs are served by one ``rpc-server
-d dev1,dev2`` per node; the client names every device an RPC server offers ``RPC<n>``, counting
on across the ``--rpc`` endpoints in the order given (ggml-rpc.cpp, ``ggml_backend_rpc_add_server``;
the endpoint is only the description). ``--rpc`` registers those devices while the command
line is parsed and ``--device`` looks names up at that moment, so ``--rpc`` comes first.
rpc-server binds ``-H`` with ``inet_addr`` (IPv4 literals only) and the client cuts an endpoint
at its first ':', so hostnames bind 0.0.0.0 and IPv6 nodes are reached by hostname.
NVML numbers GPUs in PCI bus order and CUDA, by default, fastest first: ``CUDA_DEVICE_ORDER=
PCI_BUS_ID`` makes ``CUDA<i>`` the GPU the agent reported as index i.

vLLM: ``VLLM_PP_LAYER_PARTITION`` is the comma-separated layer count of each pipeline rank in
rank order (vllm.distributed.utils.get_pp_indices): as many entries as
``--pipeline-parallel-size``, summing to ``num_hidden_layers``. vLLM ranks its Ray workers itself
(``sort_by_driver_then_worker_ip``: the driver's node first, then nodes with fewer workers, then
by IP as a string), and on each node hands local rank k the k-th lowest visible GPU; a plan
whose stage order differs from that would put the partition on the wrong GPUs, so it is refused.
vLLM needs one vendor per deployment and compute capability 7.0 or newer on NVIDIA.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardplane.bus.errors import PlannerError
from shardplane.bus.gpus import compute_capability, gpu_spec
from shardplane.bus.messages import DeviceSample, NodeHeartbeat, PlacementReply, Stage
from shardplane.planner.schedule import ENGINE_MICROBATCHES, engine_microbatches

RPC_BASE_PORT = 50052
# llama.cpp's -ts parser: ``if (split_arg.size() >= llama_max_devices()) throw`` with
# LLAMA_MAX_DEVICES 16, so at most 15 proportions.
LLAMACPP_MAX_DEVICES = 16
VLLM_MIN_CC = (7, 0)
EXPORT_KINDS = ("vllm", "llamacpp")


class ExportError(PlannerError, ValueError):
    """The plan cannot be run by this engine as planned; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Facts:
    """What the cluster state says about the planned devices and their nodes (keyed by device
    ref ``node/index`` and node id). Empty mappings still export, with what cannot be checked
    said in comments."""

    devices: Mapping[str, DeviceSample]
    nodes: Mapping[str, NodeHeartbeat]


NO_FACTS = Facts(devices={}, nodes={})


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


# -- facts about a stage ----------------------------------------------------------------------


def _index(stage: Stage) -> int:
    return int(stage.device.rsplit("/", 1)[1])


def vendor(stage: Stage, facts: Facts) -> str:
    """ "nvidia", "amd", ... from the device's telemetry, else from the known-GPU table."""
    sample = facts.devices.get(stage.device)
    if sample is not None and sample.vendor in ("nvidia", "amd"):
        return sample.vendor
    spec = gpu_spec(stage.gpu)
    if spec is not None:
        return spec.vendor
    gpu = stage.gpu.lower()
    if any(word in gpu for word in ("amd", "instinct", "radeon")):
        return "amd"
    return "nvidia" if any(w in gpu for w in ("nvidia", "tesla", "geforce")) else "unknown"


def address(node: str, facts: Facts) -> tuple[str, bool]:
    """Where peers reach ``node``: the heartbeat's address, else its hostname; the flag says
    whether it is an IP the agent found (what vLLM ranks by) rather than a name."""
    heartbeat = facts.nodes.get(node)
    if heartbeat is not None and heartbeat.address:
        return heartbeat.address, True
    if heartbeat is not None and heartbeat.hostname:
        return heartbeat.hostname, False
    return f"<address of {node}>", False


def _llamacpp_name(stage: Stage, facts: Facts) -> str:
    """The device's name in a llama.cpp build on its own host (ggml-cuda names HIP devices
    ``ROCm<i>``)."""
    return ("ROCm" if vendor(stage, facts) == "amd" else "CUDA") + str(_index(stage))


def _order_env(stages: Sequence[Stage], facts: Facts) -> str:
    return (
        "CUDA_DEVICE_ORDER=PCI_BUS_ID " if any(vendor(s, facts) == "nvidia" for s in stages) else ""
    )


# -- the comment lines (one place, so new figures are one line each) --------------------------


def _schedule_lines(reply: PlacementReply, kind: str) -> list[str]:
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
    plural = "es" if m != 1 else ""
    lines = [
        f"schedule: {why}; planned for batch {reply.batch} as {m} micro-batch{plural}: step "
        f"{reply.step_ms:.2f} ms per token per sequence, {reply.tokens_per_s:.1f} tokens/s"
    ]
    if expected != m:
        lines.append(
            f"warning: planned with M = {m} but this engine runs M = {expected}; re-plan "
            "with `shardplane place ... --export` to score its schedule"
        )
    return lines


def comment_lines(reply: PlacementReply, kind: str, notes: Sequence[str] = ()) -> list[str]:
    """The ``#`` lines above an export for engine ``kind``: what was planned, the schedule it
    was scored with, and ``notes``."""
    layers = reply.stages[-1].layer_end
    lines = [
        f"{reply.model}: {len(reply.stages)} stages, {layers} layers, instance "
        f"{reply.instance_id} generation {reply.generation}"
        + (" (dry run: nothing reserved)" if reply.dry_run else ""),
        *_schedule_lines(reply, kind),
        *notes,
    ]
    return [f"# {line}" for line in lines]


# -- llama.cpp ----------------------------------------------------------------------------------


def _rpc_host(node: str, facts: Facts) -> str:
    """What ``--rpc host:port`` can name: ggml-rpc's parse_endpoint cuts at the first ':', so an
    IPv6 address cannot be used and the node's hostname stands in for it."""
    host, _ = address(node, facts)
    heartbeat = facts.nodes.get(node)
    if ":" in host and heartbeat is not None and heartbeat.hostname:
        return heartbeat.hostname
    return host


def _bind(host: str) -> str:
    """rpc-server's ``-H``: it binds with ``inet_addr(host)`` and refuses anything that is not
    an IPv4 address ("Invalid host address"), so a hostname binds every interface instead."""
    try:
        return host if isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address) else "0.0.0.0"
    except ValueError:
        return "0.0.0.0"


def _endpoints(remote_nodes: Sequence[str], facts: Facts) -> dict[str, str]:
    """host:port per remote node; nodes sharing an address (several simulated nodes on one
    host) get consecutive ports so their rpc-servers do not collide."""
    used: dict[str, int] = {}
    out: dict[str, str] = {}
    for node in remote_nodes:
        host = _rpc_host(node, facts)
        port = RPC_BASE_PORT + used.get(host, 0)
        used[host] = used.get(host, 0) + 1
        out[node] = f"{host}:{port}"
    return out


def export_llamacpp(reply: PlacementReply, facts: Facts = NO_FACTS) -> str:
    stages = list(reply.stages)
    if len(stages) >= LLAMACPP_MAX_DEVICES:
        raise ExportError(
            f"llama.cpp takes at most {LLAMACPP_MAX_DEVICES - 1} -ts proportions; this plan has "
            f"{len(stages)} stages (re-plan with --max-stages {LLAMACPP_MAX_DEVICES - 1})"
        )
    main = stages[0].node
    # One rpc-server per remote node, serving its planned GPUs in stage order.
    served: dict[str, list[Stage]] = {}
    for s in stages:
        if s.node != main:
            served.setdefault(s.node, []).append(s)
    remote = list(served)
    endpoints = _endpoints(remote, facts)
    # RPC<n>: numbered over the endpoints in --rpc order, each server's devices in its -d order.
    rpc_name: dict[str, str] = {}
    for node in remote:
        for s in served[node]:
            rpc_name[s.device] = f"RPC{len(rpc_name)}"
    devices = [_llamacpp_name(s, facts) if s.node == main else rpc_name[s.device] for s in stages]
    counts = [s.layer_end - s.layer_start for s in stages]
    split = ",".join(f"{x:g}" for x in llamacpp_tensor_split(counts))
    layers = stages[-1].layer_end
    notes = [
        f"layer counts in --device order ({','.join(devices)}): {','.join(map(str, counts))}",
        "CUDA_DEVICE_ORDER=PCI_BUS_ID: CUDA<i> is then the GPU the agent reported as index i",
    ]
    unnamed = sorted({n for n in [main, *remote] if not address(n, facts)[1]})
    if unnamed:
        notes.append(f"no address in the heartbeat of {', '.join(unnamed)}: hostname printed")
    lines = comment_lines(reply, "llamacpp", notes)
    for node in remote:
        host, port = endpoints[node].rsplit(":", 1)
        names = ",".join(_llamacpp_name(s, facts) for s in served[node])
        lines += [
            f"# on {node} ({host}):",
            f"{_order_env(served[node], facts)}rpc-server -H {_bind(host)} -p {port} -d {names}",
        ]
    rpc = f"--rpc {','.join(endpoints[n] for n in remote)} " if remote else ""
    lines += [
        f"# on {main} ({address(main, facts)[0]})"
        + (", once the rpc-servers listen (llama-cli takes the same flags):" if remote else ":"),
        f"{_order_env(stages, facts)}llama-server -m <model.gguf> {rpc}--device {','.join(devices)} "
        f"-sm layer -ngl {layers + 1} -ts {split}",
    ]
    return "\n".join(lines)


# -- vLLM -----------------------------------------------------------------------------------------


def _check_vllm_hardware(stages: Sequence[Stage], facts: Facts) -> list[str]:
    """Raise when vLLM cannot run these GPUs together; return notes on what was not checkable."""
    by_vendor: dict[str, list[str]] = {}
    for s in stages:
        by_vendor.setdefault(vendor(s, facts), []).append(s.device)
    if len(by_vendor) > 1:
        mix = "; ".join(f"{v}: {', '.join(d)}" for v, d in sorted(by_vendor.items()))
        raise ExportError(
            f"vLLM runs one GPU vendor per deployment, and this plan mixes them ({mix}); "
            "re-plan with --exclude-node for the nodes of the other vendor"
        )
    old: list[str] = []
    unknown: list[str] = []
    for s in stages:
        if vendor(s, facts) != "nvidia":
            continue
        cc = compute_capability(s.gpu)
        if cc is None:
            unknown.append(f"{s.device} ({s.gpu})")
        elif cc < VLLM_MIN_CC:
            old.append(f"{s.device} ({s.gpu}, compute capability {cc[0]}.{cc[1]})")
    if old:
        nodes = sorted({d.split("/", 1)[0] for d in old})
        raise ExportError(
            f"vLLM needs compute capability {VLLM_MIN_CC[0]}.{VLLM_MIN_CC[1]} or newer; "
            f"{', '.join(old)} is older: re-plan without it (--exclude-node {' --exclude-node '.join(nodes)})"
        )
    if unknown:
        return [
            f"compute capability of {', '.join(unknown)} not in the known-GPU table: check it is "
            "7.0 or newer (nvidia-smi --query-gpu=compute_cap --format=csv)"
        ]
    return []


def vllm_rank_order(stages: Sequence[Stage], facts: Facts) -> tuple[list[str], bool]:
    """The device refs in the order vLLM will rank them with the driver on stage 0's node, and
    whether that order is fully known. Without every node's IP only part of vLLM's rule applies
    (the driver's node first, each node's GPUs consecutive and lowest index first); the other
    nodes are then taken in the plan's order, which is what the user must make come true."""
    ips = {s.node: address(s.node, facts) for s in stages}
    known = all(k for _, k in ips.values())
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    for i, s in enumerate(stages):
        first.setdefault(s.node, i)
        counts[ips[s.node][0]] = counts.get(ips[s.node][0], 0) + 1
    driver_ip = ips[stages[0].node][0]

    # vLLM's key is (0 if ip == driver_ip else 1, ip_counts[ip], ip), the IP compared as a string
    # ("10.0.0.10" < "10.0.0.9"); then local rank k gets the k-th lowest GPU of its node.
    def key(s: Stage) -> tuple[int, int, str, int]:
        ip = ips[s.node][0]
        if not known:
            return (first[s.node], 0, "", _index(s))
        return (0 if ip == driver_ip else 1, counts[ip], ip, _index(s))

    return [s.device for s in sorted(stages, key=key)], known


def _check_vllm_order(stages: Sequence[Stage], facts: Facts) -> list[str]:
    """Raise when vLLM would rank the planned GPUs differently (or cannot tell nodes apart);
    return a note when part of its rule could not be checked."""
    shared: dict[str, set[str]] = {}
    for node in dict.fromkeys(s.node for s in stages):
        ip, known = address(node, facts)
        if known:
            shared.setdefault(ip, set()).add(node)
    clash = [f"{ip} ({', '.join(sorted(n))})" for ip, n in shared.items() if len(n) > 1]
    if clash:
        raise ExportError(
            f"vLLM needs a distinct IP per node, and these nodes share one: {'; '.join(clash)}"
        )
    planned = [s.device for s in stages]
    order, known = vllm_rank_order(stages, facts)
    if order != planned:
        rule = (
            "driver's node first, then fewer GPUs per node, then IP as text, then GPU index"
            if known
            else "each node's GPUs as consecutive ranks, lowest index first"
        )
        raise ExportError(
            f"vLLM would rank these GPUs {', '.join(order)} ({rule}), but the plan's stage "
            f"order is {', '.join(planned)}: the partition would land on the wrong GPUs; use "
            "--export llamacpp, or re-plan (e.g. --max-stages, --exclude-node) until they agree"
        )
    if known:
        return []
    return [
        "node addresses unknown, so vLLM's order between nodes could not be checked: it ranks "
        "the driver's node first, then nodes with fewer GPUs, then by IP (as text); the nodes "
        "must come out in the order of the ranks below"
    ]


def _vllm_commands(reply: PlacementReply, facts: Facts) -> list[str]:
    """One ``ray start`` per node exposing exactly its planned GPUs, then the partition and
    ``vllm serve`` on the driver (stage 0's node)."""
    stages = reply.stages
    env = "HIP_VISIBLE_DEVICES" if vendor(stages[0], facts) == "amd" else "CUDA_VISIBLE_DEVICES"
    driver = stages[0].node
    ips = {s.node: address(s.node, facts) for s in stages}
    # vLLM ranks by get_ip(), which is VLLM_HOST_IP when set and otherwise the route to a public
    # address: pinning it (and Ray's node IP) to the address checked above makes the check hold.
    pin = {n: f"VLLM_HOST_IP={ip} " if known else "" for n, (ip, known) in ips.items()}
    lines: list[str] = []
    for node in dict.fromkeys(s.node for s in stages):
        mine = sorted(_index(s) for s in stages if s.node == node)
        host, known = ips[node]
        start = (
            "ray start --head" if node == driver else f"ray start --address {ips[driver][0]}:6379"
        )
        node_ip = f" --node-ip-address {host}" if known else ""
        lines += [
            f"# on {node} ({host}){': the driver, rank 0 is here' if node == driver else ''}:",
            f"{_order_env([s for s in stages if s.node == node], facts)}{pin[node]}{env}="
            f"{','.join(map(str, mine))} {start}{node_ip} --num-gpus {len(mine)}",
        ]
    return [
        *lines,
        f"# then on {driver}:",
        f'export VLLM_PP_LAYER_PARTITION="{vllm_partition(reply)}"',
        f"{pin[driver]}vllm serve <model> --pipeline-parallel-size {len(stages)} "
        "--tensor-parallel-size 1 --distributed-executor-backend ray",
    ]


def export_vllm(reply: PlacementReply, facts: Facts = NO_FACTS) -> str:
    stages = list(reply.stages)
    notes = _check_vllm_hardware(stages, facts) + _check_vllm_order(stages, facts)
    notes += [
        f"rank {i}: {s.device} ({s.gpu}) layers {s.layer_start}-{s.layer_end - 1}"
        for i, s in enumerate(stages)
    ]
    lines = comment_lines(reply, "vllm", notes)
    return "\n".join([*lines, *_vllm_commands(reply, facts)])


def export_plan(reply: PlacementReply, kind: str, facts: Facts = NO_FACTS) -> str:
    """The plan as shell lines for ``kind`` ("vllm" or "llamacpp"); a failed reply says why.

    Raises ExportError when the engine cannot run the plan as planned."""
    if kind not in EXPORT_KINDS:
        raise ValueError(f"unknown export kind {kind!r}; use 'vllm' or 'llamacpp'")
    if not reply.ok or not reply.stages:
        err = reply.error
        return f"# no plan: {err.code + ': ' + err.message if err else 'empty reply'}"
    if kind == "vllm":
        return export_vllm(reply, facts)
    return export_llamacpp(reply, facts)
