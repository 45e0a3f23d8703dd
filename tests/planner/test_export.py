"""Exports, run through re-implementations of the engines' own argument parsers and rank rules.

Each check below quotes the upstream rule it re-implements (llama.cpp: tools/rpc/rpc-server.cpp,
common/arg.cpp, ggml/src/ggml-rpc/ggml-rpc.cpp; vLLM: vllm/distributed/utils.py get_pp_indices,
vllm/v1/executor/ray_executor.py). A printed line that the engine would reject, or that would
land a layer on another GPU than planned, fails here.
"""

from __future__ import annotations

import random
import re
import shlex
from dataclasses import dataclass

import pytest

from shardplane.bus.messages import DeviceSample, NodeHeartbeat, PlacementReply, Stage
from shardplane.planner.export import (
    ExportError,
    Facts,
    export_plan,
    llamacpp_layers,
    llamacpp_tensor_split,
    vllm_partition,
)

GPU = {
    "a100": "NVIDIA A100-SXM4-80GB",
    "4090": "NVIDIA GeForce RTX 4090",
    "p40": "Tesla P40",
    "mi250x": "AMD Instinct MI250X",
}


def _reply(plan: list[tuple[str, int, str, int]]) -> PlacementReply:
    """``plan``: (node, device index, GPU key, layer count) per stage, in stage order."""
    stages: list[Stage] = []
    start = 0
    for node, index, gpu, count in plan:
        stages.append(
            Stage(
                node=node,
                device=f"{node}/{index}",
                gpu=GPU[gpu],
                layer_start=start,
                layer_end=start + count,
                weight_bytes=1,
                kv_bytes=1,
                bandwidth_gbps=1.0,
                stage_ms=1.0,
                hop_ms=0.0,
            )
        )
        start += count
    return PlacementReply(
        ok=True,
        instance_id="x",
        generation=1,
        model="llama-3.1-70b",
        stages=tuple(stages),
        dry_run=True,
    )


def _facts(reply: PlacementReply, addresses: dict[str, str | None]) -> Facts:
    devices: dict[str, DeviceSample] = {}
    for s in reply.stages:
        node, index = s.device.split("/")
        vendor = "amd" if "AMD" in s.gpu else "nvidia"
        devices[s.device] = DeviceSample(
            node=node, index=int(index), uuid=f"u-{s.device}", seq=1, ts=1.0, vendor=vendor
        )
    nodes = {
        n: NodeHeartbeat(node=n, seq=1, ts=1.0, hostname=f"host-{n}", address=a)
        for n, a in addresses.items()
    }
    return Facts(devices=devices, nodes=nodes)


# -- llama.cpp ----------------------------------------------------------------------------------


@dataclass
class Host:
    """A node's machine with a llama.cpp build: its local device names."""

    devices: list[str]


Servers = dict[str, tuple[str, list[str]]]  # "host:port" -> (node, -d devices)


def _blocks(text: str) -> list[tuple[str, str, str]]:
    """(node, host, command) for every ``# on NODE (HOST)...:`` comment and the line after."""
    lines = text.splitlines()
    out: list[tuple[str, str, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"# on (\S+) \(([^)]+)\)", line)
        if m:
            out.append((m.group(1), m.group(2), lines[i + 1]))
    return out


def _env_and_argv(command: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(command)
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def rpc_server(servers: Servers, node: str, host: Host, address: str, argv: list[str]) -> None:
    """rpc-server.cpp, rpc_server_params_parse and get_devices."""
    assert argv[0] == "rpc-server"
    bind, port, devices = "127.0.0.1", 50052, []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("-H", "--host"):
            bind = argv[i + 1]
        elif arg in ("-p", "--port"):
            port = int(argv[i + 1])
            # "if (params.port <= 0 || params.port > 65535) { return false; }"
            assert 0 < port <= 65535
        elif arg in ("-d", "--device"):
            # "const std::regex regex{ R"([,/]+)" };" then one ggml_backend_dev_by_name each;
            # "error: unknown device" when a name is not there.
            devices = [d for d in re.split(r"[,/]+", argv[i + 1]) if d]
            for d in devices:
                assert d in host.devices, f"rpc-server: error: unknown device: {d}"
        else:
            raise AssertionError(f"rpc-server: error: unknown argument: {arg}")
        i += 2
    # create_server_socket: "if (inet_addr(host) == INADDR_NONE) { ... "Invalid host address"":
    # an IPv4 literal only, and one peers can reach (the default 127.0.0.1 would refuse them).
    assert re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", bind), f"Invalid host address: {bind}"
    assert bind in (address, "0.0.0.0"), (bind, address)
    servers[f"{address}:{port}"] = (node, devices)


def llama_server(
    servers: Servers, node: str, host: Host, argv: list[str]
) -> tuple[list[tuple[str, str]], list[float], int]:
    """common/arg.cpp, parsed left to right as common_params_parse does. Returns the --device
    list as (node, local device name), the -ts proportions and -ngl."""
    assert argv[0] in ("llama-server", "llama-cli")
    known: dict[str, tuple[str, str]] = {d: (node, d) for d in host.devices}
    rpc_count = 0
    devices: list[tuple[str, str]] = []
    split: list[float] = []
    ngl = -1
    i = 1
    while i < len(argv):
        arg, value = argv[i], argv[i + 1] if i + 1 < len(argv) else ""
        if arg == "--rpc":
            # add_rpc_devices: "string_split<std::string>(servers, ',')", then per server
            # ggml_backend_rpc_add_server: "std::string dev_name = "RPC" + std::to_string(dev_id);"
            # with "dev_id++" for each of the server's devices, the counter shared by all servers.
            for endpoint in value.split(","):
                # parse_endpoint: "size_t pos = endpoint.find(':'); host = endpoint.substr(0, pos);
                # port = std::stoi(endpoint.substr(pos + 1));"
                pos = endpoint.find(":")
                assert pos > 0, f"Failed to parse endpoint: {endpoint}"
                assert 0 < int(endpoint[pos + 1 :]) <= 65535
                assert endpoint in servers, f"Failed to connect to {endpoint}"
                remote, served = servers[endpoint]
                for local in served:
                    known[f"RPC{rpc_count}"] = (remote, local)
                    rpc_count += 1
        elif arg == "--device":
            # parse_device_list: "auto * dev = ggml_backend_dev_by_name(device.c_str());
            # if (!dev || ...) throw std::invalid_argument("invalid device: ...")": names are
            # looked up while parsing, so RPC devices exist only after --rpc.
            for name in value.split(","):
                assert name in known, f"invalid device: {name}"
                devices.append(known[name])
        elif arg in ("-ts", "--tensor-split"):
            parts = re.split(r"[,/]+", value)
            # "if (split_arg.size() >= llama_max_devices()) throw" (LLAMA_MAX_DEVICES 16)
            assert len(parts) < 16
            split = [float(p) for p in parts]
        elif arg in ("-sm", "--split-mode"):
            # "none" | "layer" | "row" (| "tensor"), else "invalid value"
            assert value in ("none", "layer", "row", "tensor")
            assert value == "layer"
        elif arg in ("-ngl", "--gpu-layers", "--n-gpu-layers"):
            ngl = int(value)
        elif arg == "-m":
            pass
        else:
            raise AssertionError(f"error: invalid argument: {arg}")
        i += 2
    return devices, split, ngl


def run_llamacpp(text: str, facts: Facts, hosts: dict[str, Host]) -> list[tuple[str, int]]:
    """Run every printed line through the parsers, each on its node's machine (``hosts`` by
    node); return (device ref, layers) per --device entry."""
    servers: Servers = {}
    placed: list[tuple[str, int]] = []
    for node, address, command in _blocks(text):
        env, argv = _env_and_argv(command)
        hb = facts.nodes[node]
        assert address in (hb.address, hb.hostname), "the address printed is the node's"
        if any(d.startswith("CUDA") for d in hosts[node].devices):
            # NVML's index i is CUDA's ordinal i only in PCI bus order.
            assert env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID", command
        if argv[0] == "rpc-server":
            rpc_server(servers, node, hosts[node], address, argv)
            continue
        devices, split, ngl = llama_server(servers, node, hosts[node], argv)
        n_layer = ngl - 1  # the export offloads every layer and the output slot
        assert len(split) == len(devices)
        counts = llamacpp_layers(split, n_layer)
        for (owner, local), count in zip(devices, counts, strict=True):
            index = int(re.sub(r"^\D+", "", local))
            placed.append((f"{owner}/{index}", count))
    return placed


def _hosts(reply: PlacementReply) -> dict[str, Host]:
    hosts: dict[str, Host] = {}
    for s in reply.stages:
        prefix = "ROCm" if "AMD" in s.gpu else "CUDA"
        hosts.setdefault(s.node, Host(devices=[f"{prefix}{i}" for i in range(4)]))
    return hosts


PLANS = {
    "local only": [("a", 0, "a100", 40), ("a", 1, "a100", 40)],
    "three nodes": [
        ("a", 0, "a100", 30),
        ("b", 1, "4090", 20),
        ("b", 0, "4090", 14),
        ("d", 1, "mi250x", 16),
    ],
    "back to main": [("b", 0, "4090", 10), ("a", 0, "a100", 50), ("b", 1, "4090", 20)],
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_llamacpp_lines_parse_and_land_every_layer_as_planned(name: str) -> None:
    reply = _reply(PLANS[name])
    facts = _facts(reply, {"a": "10.0.0.1", "b": "10.0.0.2", "d": "10.0.0.4"})
    text = export_plan(reply, "llamacpp", facts)
    placed = run_llamacpp(text, facts, _hosts(reply))
    assert placed == [(s.device, s.layer_end - s.layer_start) for s in reply.stages], text


def test_llamacpp_one_rpc_server_per_node_serving_all_its_gpus() -> None:
    reply = _reply(PLANS["three nodes"])
    facts = _facts(reply, {"a": "10.0.0.1", "b": "10.0.0.2", "d": "10.0.0.4"})
    text = export_plan(reply, "llamacpp", facts)
    servers = [
        line for line in text.splitlines() if "rpc-server " in line and not line.startswith("#")
    ]
    assert len(servers) == 2, text
    assert "rpc-server -H 10.0.0.2 -p 50052 -d CUDA1,CUDA0" in text
    assert "rpc-server -H 10.0.0.4 -p 50052 -d ROCm1" in text
    assert "--rpc 10.0.0.2:50052,10.0.0.4:50052 --device CUDA0,RPC0,RPC1,RPC2" in text
    # Node ids are not hostnames: "b" appears only in comments.
    assert " b:" not in text and "RPC[" not in text


def test_the_parser_model_rejects_rpc_after_device() -> None:
    """The check above could fail: the same line with --rpc moved after --device is refused."""
    reply = _reply(PLANS["three nodes"])
    facts = _facts(reply, {"a": "10.0.0.1", "b": "10.0.0.2", "d": "10.0.0.4"})
    text = export_plan(reply, "llamacpp", facts)
    swapped = re.sub(r"(--rpc \S+) (--device \S+)", r"\2 \1", text)
    assert swapped != text
    with pytest.raises(AssertionError, match="invalid device: RPC0"):
        run_llamacpp(swapped, facts, _hosts(reply))


def test_llamacpp_nodes_sharing_an_address_get_their_own_ports() -> None:
    # A simulated fleet: every node on one host, no address, the heartbeat's hostname shared.
    reply = _reply([("a", 0, "a100", 40), ("b", 0, "4090", 20), ("c", 0, "4090", 20)])
    facts = _facts(reply, {"a": None, "b": None, "c": None})
    facts = Facts(
        devices=facts.devices,
        nodes={n: NodeHeartbeat(node=n, seq=1, ts=1.0, hostname="lab") for n in "abc"},
    )
    text = export_plan(reply, "llamacpp", facts)
    assert "-p 50052" in text and "-p 50053" in text and "--rpc lab:50052,lab:50053" in text
    assert "no address in the heartbeat" in text
    # A hostname cannot be bound by rpc-server: it listens on every interface instead.
    assert "rpc-server -H 0.0.0.0 -p 50052" in text
    assert run_llamacpp(text, facts, _hosts(reply)) == [
        (s.device, s.layer_end - s.layer_start) for s in reply.stages
    ]


def test_llamacpp_reaches_an_ipv6_node_by_hostname() -> None:
    reply = _reply([("a", 0, "a100", 40), ("b", 0, "4090", 40)])
    facts = _facts(reply, {"a": "10.0.0.1", "b": "fd00::2"})
    text = export_plan(reply, "llamacpp", facts)
    assert "--rpc host-b:50052" in text and "rpc-server -H 0.0.0.0 -p 50052 -d CUDA0" in text


def test_llamacpp_refuses_more_devices_than_its_parser_takes() -> None:
    reply = _reply([("a", i % 4, "a100", 2) for i in range(16)])
    with pytest.raises(ExportError, match="at most 15"):
        export_plan(reply, "llamacpp")


@pytest.mark.parametrize("seed", range(30))
def test_llamacpp_split_lands_exact_counts(seed: int) -> None:
    rng = random.Random(seed)
    k = rng.randint(1, 8)
    counts = [rng.randint(1, 30) for _ in range(k)]
    split = llamacpp_tensor_split(counts)
    assert llamacpp_layers(split, sum(counts)) == counts


# -- vLLM -----------------------------------------------------------------------------------------


def get_pp_indices_partition(partition: str, num_hidden_layers: int, pp_size: int) -> list[int]:
    """vllm/distributed/utils.py get_pp_indices, with VLLM_PP_LAYER_PARTITION set."""
    partitions = [int(layer) for layer in partition.split(",")]
    # "if len(partitions) != pp_size: raise ValueError(f"{len(partitions)=} does not match {pp_size=}.")"
    assert len(partitions) == pp_size
    # "if sum(partitions) != num_hidden_layers: raise ValueError(...)"
    assert sum(partitions) == num_hidden_layers
    return partitions


def vllm_ranks(text: str, facts: Facts) -> list[str]:
    """The device each rank gets, from the printed lines alone, the way vLLM decides: each
    process's IP is get_ip(), "host_ip = envs.VLLM_HOST_IP; ... if host_ip: return host_ip";
    the Ray executor sorts workers by "return 0 if ip == driver_ip else 1, ip_counts[ip], ip"
    (a stable sort), and local rank k on a node gets the k-th of its GPU ids sorted as ints."""
    serve = re.search(r"# then on (\S+):\n.*\n(.*vllm serve.*)", text)
    assert serve is not None
    driver_ip = _env_and_argv(serve.group(2))[0]["VLLM_HOST_IP"]
    node_of: dict[str, str] = {}
    workers: list[tuple[str, int]] = []  # (ip, visible GPU) per Ray worker
    for node, address, command in _blocks(text):
        env, argv = _env_and_argv(command)
        assert argv[:2] == ["ray", "start"] and facts.nodes[node].address == address
        assert env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
        ip = env["VLLM_HOST_IP"]
        assert argv[argv.index("--node-ip-address") + 1] == ip
        node_of[ip] = node
        visible = sorted(int(x) for x in env["CUDA_VISIBLE_DEVICES"].split(","))
        count = int(argv[argv.index("--num-gpus") + 1])
        assert count == len(visible)
        workers += [(ip, g) for g in visible]
    assert node_of[driver_ip] == serve.group(1)
    ip_counts: dict[str, int] = {}
    for ip, _ in workers:
        ip_counts[ip] = ip_counts.get(ip, 0) + 1
    ordered = sorted(workers, key=lambda w: (0 if w[0] == driver_ip else 1, ip_counts[w[0]], w[0]))
    return [f"{node_of[ip]}/{gpu}" for ip, gpu in ordered]


def test_vllm_partition_lands_on_the_planned_gpus_in_vllms_rank_order() -> None:
    # Driver a (stage 0); then b (1 GPU) before c (2 GPUs): fewer workers first.
    reply = _reply(
        [("a", 0, "a100", 30), ("b", 0, "4090", 10), ("c", 0, "4090", 20), ("c", 2, "4090", 20)]
    )
    facts = _facts(reply, {"a": "10.0.0.9", "b": "10.0.0.10", "c": "10.0.0.3"})
    text = export_plan(reply, "vllm", facts)
    partition = re.search(r'VLLM_PP_LAYER_PARTITION="([^"]+)"', text)
    assert partition is not None
    pp = int(re.search(r"--pipeline-parallel-size (\d+)", text).group(1))  # type: ignore[union-attr]
    counts = get_pp_indices_partition(partition.group(1), 80, pp)
    ranks = vllm_ranks(text, facts)
    assert list(zip(ranks, counts, strict=True)) == [
        (s.device, s.layer_end - s.layer_start) for s in reply.stages
    ], text
    assert vllm_partition(reply) == "30,10,20,20"


def test_vllm_refuses_a_plan_whose_order_vllm_would_change() -> None:
    # IPs compare as text: "10.0.0.10" < "10.0.0.9", so vLLM puts b before c.
    reply = _reply([("a", 0, "a100", 40), ("c", 0, "4090", 20), ("b", 0, "4090", 20)])
    facts = _facts(reply, {"a": "10.0.0.1", "b": "10.0.0.10", "c": "10.0.0.9"})
    with pytest.raises(ExportError, match=r"would rank these GPUs a/0, b/0, c/0"):
        export_plan(reply, "vllm", facts)


def test_vllm_refuses_a_node_whose_gpus_the_plan_orders_downwards() -> None:
    # No addresses needed: on a node vLLM gives local rank k the k-th lowest GPU.
    reply = _reply([("b", 1, "4090", 10), ("b", 0, "4090", 22)])
    with pytest.raises(ExportError, match=r"would rank these GPUs b/0, b/1 \(each node's GPUs"):
        export_plan(reply, "vllm")
    split = _reply([("a", 0, "a100", 10), ("b", 0, "4090", 10), ("a", 1, "a100", 12)])
    with pytest.raises(ExportError, match=r"would rank these GPUs a/0, a/1, b/0"):
        export_plan(split, "vllm")


def test_vllm_refuses_mixed_vendors_and_old_gpus() -> None:
    mixed = _reply([("a", 0, "a100", 40), ("d", 0, "mi250x", 40)])
    with pytest.raises(ExportError, match=r"one GPU vendor.*amd: d/0; nvidia: a/0"):
        export_plan(mixed, "vllm", _facts(mixed, {"a": "10.0.0.1", "d": "10.0.0.4"}))
    old = _reply([("a", 0, "a100", 40), ("c", 1, "p40", 40)])
    with pytest.raises(
        ExportError, match=r"c/1 \(Tesla P40, compute capability 6\.1\).*--exclude-node c"
    ):
        export_plan(old, "vllm", _facts(old, {"a": "10.0.0.1", "c": "10.0.0.3"}))


def test_vllm_states_what_it_could_not_check_and_refuses_shared_ips() -> None:
    reply = _reply([("a", 0, "a100", 40), ("b", 0, "4090", 40)])
    text = export_plan(reply, "vllm")
    assert "order between nodes could not be checked" in text and "CUDA_VISIBLE_DEVICES=0" in text
    with pytest.raises(ExportError, match="distinct IP per node"):
        export_plan(reply, "vllm", _facts(reply, {"a": "127.0.0.1", "b": "127.0.0.1"}))


def test_failed_reply_exports_the_reason() -> None:
    from shardplane.bus.messages import ErrorInfo

    bad = PlacementReply(
        ok=False, error=ErrorInfo(code="insufficient_memory", message="short by 3.1 GiB")
    )
    assert "short by 3.1 GiB" in export_plan(bad, "vllm")
    with pytest.raises(ValueError, match="unknown export kind"):
        export_plan(_reply([("a", 0, "a100", 1)]), "tgi")


def test_exports_say_which_schedule_they_were_planned_for() -> None:
    """llama.cpp runs M = 1, vLLM one micro-batch per rank; the comment lines say so, with the
    step time, and warn when the plan was scored with another M."""
    from msgspec.structs import replace

    reply = replace(
        _reply([("a", 0, "a100", 30), ("a", 1, "a100", 50)]), batch=8, microbatches=1, step_ms=20.0
    )
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

    from shardplane.placing import _request_from_args  # pyright: ignore[reportPrivateUsage]
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
        _reply([("a", 0, "a100", 30), ("a", 1, "a100", 50)]),
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
