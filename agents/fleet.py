"""The simulated fleet file (TOML): which nodes exist, their GPUs, links, faults, and a seed.

```toml
seed = 7                 # same seed, same telemetry (values and UUIDs)
interval_s = 2.0         # sample interval (the agent's --interval wins)

[network]                # node-to-node links not listed under [[links]]
default_gbps = 10.0      # Gbit/s
default_latency_ms = 0.2

[[nodes]]
name = "rig-d"                          # a subject token; with count = N: rig-d-0 .. rig-d-(N-1)
gpus = [{ model = "MI250X", count = 2 }] # model: a key or alias of bus.gpus.KNOWN_GPUS
nvlink = [[0, 1]]                       # device pairs joined by NVLink / Infinity Fabric
nvlink_gbps = 200.0                     # GB/s per pair and direction (default: by GPU)
interconnect = "xgmi"                   # default: "nvlink" with NVLink pairs, else "pcie"
cpu_count = 64
host_memory_gib = 512
load = 0.3                              # mean GPU utilisation, 0..1 (default 0.3)
count = 1                               # replicate this node (scale tests)

[[links]]                               # symmetric
a = "rig-a"
b = "rig-d"
gbps = 100.0
latency_ms = 0.01

[[faults]]                              # on the simulated clock (ticks x interval)
at_s = 30.0
node = "rig-b"
device = 1                              # omit for node faults (silent / resume)
kind = "vanish"                         # vanish return throttle unthrottle fill drain silent resume
duration_s = 20.0                       # optional: revert after this long
fraction = 0.98                         # fill: share of memory to fill
```

Everything is validated on load; an error names the field and what was wrong with it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from shardplane.bus.errors import AgentError
from shardplane.bus.gpus import GpuSpec, gpu_spec
from shardplane.bus.ids import TOKEN_PATTERN

Name = Annotated[str, Meta(pattern=TOKEN_PATTERN)]
NonNeg = Annotated[float, Meta(ge=0.0)]
Positive = Annotated[float, Meta(gt=0.0)]

FaultKind = Literal[
    "vanish", "return", "throttle", "unthrottle", "fill", "drain", "silent", "resume"
]
NODE_FAULTS: frozenset[str] = frozenset({"silent", "resume"})


class FleetError(AgentError, ValueError):
    """A fleet file that cannot be simulated; ``str()`` names the file, field and value."""


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class GpuGroup(_Strict, frozen=True):
    model: str
    count: Annotated[int, Meta(ge=1, le=64)] = 1


class NodeSpec(_Strict, frozen=True):
    name: Name
    gpus: tuple[GpuGroup, ...] = ()
    nvlink: tuple[tuple[int, int], ...] = ()
    nvlink_gbps: Positive | None = None
    interconnect: Literal["nvlink", "xgmi", "pcie"] | None = None
    cpu_count: Annotated[int, Meta(ge=1)] = 16
    host_memory_gib: Positive = 64.0
    cpu_bandwidth_gbps: Positive = 50.0
    load: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.3
    count: Annotated[int, Meta(ge=1, le=100_000)] = 1


class LinkSpec(_Strict, frozen=True):
    a: Name
    b: Name
    gbps: Positive
    latency_ms: NonNeg = 0.0


class NetworkSpec(_Strict, frozen=True):
    default_gbps: Positive = 10.0
    default_latency_ms: NonNeg = 0.2


class FaultSpec(_Strict, frozen=True):
    at_s: NonNeg
    node: Name
    kind: FaultKind
    device: Annotated[int, Meta(ge=0)] | None = None
    duration_s: Positive | None = None
    fraction: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.98


class FleetFile(_Strict, frozen=True):
    seed: int = 0
    interval_s: Positive = 2.0
    network: NetworkSpec = NetworkSpec()
    nodes: tuple[NodeSpec, ...] = ()
    links: tuple[LinkSpec, ...] = ()
    faults: tuple[FaultSpec, ...] = ()


class SimGpu(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    spec: GpuSpec


class SimNodeSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One expanded node: what the simulator needs to produce its telemetry."""

    name: str
    gpus: tuple[SimGpu, ...]
    nvlink: tuple[tuple[int, int], ...]
    nvlink_gbps: float | None
    interconnect: str
    cpu_count: int
    host_memory_bytes: int
    cpu_bandwidth_gbps: float
    load: float


class Fleet(msgspec.Struct, frozen=True, kw_only=True):
    seed: int
    interval_s: float
    network: NetworkSpec
    nodes: tuple[SimNodeSpec, ...]
    links: tuple[LinkSpec, ...]
    faults: tuple[FaultSpec, ...]

    def node(self, name: str) -> SimNodeSpec | None:
        for spec in self.nodes:
            if spec.name == name:
                return spec
        return None

    def device_count(self) -> int:
        return sum(len(n.gpus) for n in self.nodes)


def _expand(spec: NodeSpec) -> list[str]:
    if spec.count == 1:
        return [spec.name]
    width = len(str(spec.count - 1))
    names = [f"{spec.name}-{i:0{width}d}" for i in range(spec.count)]
    if len(names[-1]) > 64:
        raise FleetError(f"nodes.{spec.name}: count {spec.count} makes names over 64 characters")
    return names


def build(raw: FleetFile, source: str = "fleet") -> Fleet:
    """Expand and cross-check a parsed fleet file (pure; raises FleetError)."""
    nodes: list[SimNodeSpec] = []
    seen: set[str] = set()
    for spec in raw.nodes:
        gpus: list[SimGpu] = []
        for group in spec.gpus:
            known = gpu_spec(group.model)
            if known is None:
                raise FleetError(
                    f"{source}: nodes.{spec.name}.gpus: unknown GPU model {group.model!r} "
                    "(use a key or alias from bus.gpus.KNOWN_GPUS)"
                )
            base = len(gpus)
            gpus.extend(SimGpu(index=base + i, spec=known) for i in range(group.count))
        for a, b in spec.nvlink:
            if not (0 <= a < len(gpus) and 0 <= b < len(gpus)) or a == b:
                raise FleetError(
                    f"{source}: nodes.{spec.name}.nvlink: pair [{a}, {b}] must name two distinct "
                    f"devices in 0..{len(gpus) - 1}"
                )
        interconnect = spec.interconnect or ("nvlink" if spec.nvlink else "pcie")
        for name in _expand(spec):
            if name in seen:
                raise FleetError(f"{source}: node {name!r} is defined twice")
            seen.add(name)
            nodes.append(
                SimNodeSpec(
                    name=name,
                    gpus=tuple(gpus),
                    nvlink=spec.nvlink,
                    nvlink_gbps=spec.nvlink_gbps,
                    interconnect=interconnect,
                    cpu_count=spec.cpu_count,
                    host_memory_bytes=int(spec.host_memory_gib * 1024**3),
                    cpu_bandwidth_gbps=spec.cpu_bandwidth_gbps,
                    load=spec.load,
                )
            )
    by_name = {n.name: n for n in nodes}
    for i, link in enumerate(raw.links):
        for end in (link.a, link.b):
            if end not in by_name:
                raise FleetError(f"{source}: links[{i}]: unknown node {end!r}")
        if link.a == link.b:
            raise FleetError(f"{source}: links[{i}]: a link joins two different nodes")
    for i, fault in enumerate(raw.faults):
        node = by_name.get(fault.node)
        if node is None:
            raise FleetError(f"{source}: faults[{i}]: unknown node {fault.node!r}")
        if fault.kind in NODE_FAULTS:
            continue
        if fault.device is None:
            raise FleetError(f"{source}: faults[{i}]: kind {fault.kind!r} needs a device index")
        if fault.device >= len(node.gpus):
            raise FleetError(
                f"{source}: faults[{i}]: device {fault.device} does not exist on {fault.node} "
                f"(it has {len(node.gpus)})"
            )
    return Fleet(
        seed=raw.seed,
        interval_s=raw.interval_s,
        network=raw.network,
        nodes=tuple(nodes),
        links=raw.links,
        faults=tuple(sorted(raw.faults, key=lambda f: f.at_s)),
    )


def parse(text: str, source: str = "fleet") -> Fleet:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(f"{source}: not valid TOML: {exc}") from exc
    try:
        raw = msgspec.convert(data, FleetFile)
    except msgspec.ValidationError as exc:
        raise FleetError(f"{source}: {exc}") from exc
    return build(raw, source)


def load(path: Path) -> Fleet:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FleetError(f"cannot read fleet file {path}: {exc}") from exc
    return parse(text, str(path))


LinkTable = dict[str, dict[str, tuple[float, float]]]
LIST_ALL_PEERS_UP_TO = 64


def link_table(fleet: Fleet) -> LinkTable:
    """node -> peer -> (Gbit/s, latency ms) of the listed links, both directions, built once
    (scanning the link list per node would be quadratic in a big fleet)."""
    table: LinkTable = {}
    for link in fleet.links:
        table.setdefault(link.a, {})[link.b] = (link.gbps, link.latency_ms)
        table.setdefault(link.b, {})[link.a] = (link.gbps, link.latency_ms)
    return table


def peer_links(
    fleet: Fleet, node: str, table: LinkTable | None = None
) -> tuple[tuple[str, float, float], ...]:
    """(peer, Gbit/s, latency ms) for every link of ``node``: the listed ones, plus the network
    default to every other node while the fleet is small enough that listing them all is cheap
    (above 64 nodes the heartbeat carries only the listed links, and the default separately)."""
    out: dict[str, tuple[float, float]] = {}
    if len(fleet.nodes) <= LIST_ALL_PEERS_UP_TO:
        default = (fleet.network.default_gbps, fleet.network.default_latency_ms)
        out = {other.name: default for other in fleet.nodes if other.name != node}
    out.update((table if table is not None else link_table(fleet)).get(node, {}))
    return tuple((peer, gbps, lat) for peer, (gbps, lat) in sorted(out.items()))
