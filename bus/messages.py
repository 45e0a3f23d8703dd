"""Every message that crosses a process boundary, as frozen msgspec Structs.

Evolution is additive: every field added after v1 must be optional with a default, so old
readers and writers keep working. ``v`` is the schema version the writer spoke.
Readers ignore unknown fields on telemetry (newer agents), but a ``PlacementRequest`` forbids
them, because there an unknown field is almost always a typo a user should hear about.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from shardplane.bus import SCHEMA_VERSION

Token = Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,64}$", description="NATS subject token")]
DeviceRef = Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,64}/[0-9]{1,4}$")]
Bytes = Annotated[int, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]
Index = Annotated[int, Meta(ge=0, le=4095)]
Percent = Annotated[float, Meta(ge=0.0, le=100.0)]
NonNeg = Annotated[float, Meta(ge=0.0)]
Celsius = Annotated[float, Meta(ge=-60.0, le=200.0)]
Timestamp = Annotated[float, Meta(ge=0.0)]
Version = Annotated[int, Meta(ge=1)]
Layer = Annotated[int, Meta(ge=0)]


class Frozen(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    pass


# --- telemetry -------------------------------------------------------------------------------


class NvLink(Frozen, frozen=True):
    link: Count
    peer_pci_bus_id: str | None = None
    peer_uuid: str | None = None
    gbps: NonNeg | None = None


class DeviceSample(Frozen, frozen=True):
    """One reading of one GPU. Every measured field is optional on its own: a field the
    driver cannot report is None for that sample, never a reason to drop the sample."""

    node: Token
    index: Index
    uuid: Annotated[str, Meta(min_length=1, max_length=128)]
    seq: Count
    ts: Timestamp
    v: Version = SCHEMA_VERSION
    present: bool = True  # False: the device was lost (fell off the bus, vanished)
    vendor: Literal["nvidia", "amd", "sim", "cpu"] = "sim"
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total_bytes: Bytes | None = None
    memory_used_bytes: Bytes | None = None
    memory_free_bytes: Bytes | None = None
    utilization_gpu_pct: Percent | None = None
    utilization_memory_pct: Percent | None = None
    temperature_c: Celsius | None = None
    power_w: NonNeg | None = None
    power_limit_w: NonNeg | None = None
    sm_clock_mhz: NonNeg | None = None
    sm_clock_max_mhz: NonNeg | None = None
    memory_clock_mhz: NonNeg | None = None
    memory_clock_max_mhz: NonNeg | None = None
    memory_bus_width_bits: Count | None = None
    bandwidth_gbps: NonNeg | None = None  # theoretical peak memory bandwidth, GB/s
    tflops: NonNeg | None = None  # dense fp16/bf16, where known
    throttle_reasons: tuple[str, ...] = ()
    ecc_uncorrected: Count | None = None
    xid_errors: Count | None = None
    nvlinks: tuple[NvLink, ...] = ()
    pcie_gen: Count | None = None
    pcie_width: Count | None = None
    unsupported: tuple[str, ...] = ()  # fields the backend could not read this time
    # When the publisher (agent, worker) started, seconds since the Unix epoch. ``seq`` restarts
    # at 0 with each epoch, so readers order by (epoch, seq, ts); 0.0 from older writers.
    epoch: Timestamp = 0.0
    # The rest of the DCGM exporter's default counters (api/metrics.py maps each one).
    driver_version: Annotated[str, Meta(max_length=64)] | None = None
    memory_reserved_bytes: Bytes | None = None  # held by the driver, in neither used nor free
    memory_temperature_c: Celsius | None = None  # HBM parts only
    energy_mj: Count | None = None  # total energy since the driver loaded, millijoules
    utilization_encoder_pct: Percent | None = None
    utilization_decoder_pct: Percent | None = None
    pcie_replay_count: Count | None = None  # PCIe retries since the driver loaded
    pcie_tx_bytes_per_s: NonNeg | None = None  # over the last sampling interval
    pcie_rx_bytes_per_s: NonNeg | None = None
    xid_last: Count | None = None  # the newest XID error's code; 0: none since the agent started
    remapped_rows_correctable: Count | None = None
    remapped_rows_uncorrectable: Count | None = None
    row_remap_failed: bool | None = None


class NetInterface(Frozen, frozen=True):
    name: str
    speed_mbps: NonNeg | None = None


class NetLink(Frozen, frozen=True):
    """A network path from this node to a peer node, as configured or measured."""

    peer: Token
    gbps: NonNeg
    latency_ms: NonNeg = 0.0


class NodeHeartbeat(Frozen, frozen=True):
    node: Token
    seq: Count
    ts: Timestamp
    v: Version = SCHEMA_VERSION
    online: bool = True  # False in the last heartbeat of a graceful shutdown
    hostname: str = ""
    agent_version: str = ""
    cpu_count: Count | None = None
    host_memory_bytes: Bytes | None = None
    interfaces: tuple[NetInterface, ...] = ()
    links: tuple[NetLink, ...] = ()
    interconnect: str | None = None  # "nvlink", "xgmi", "pcie"
    backend: str = "none"
    skipped: dict[str, str] = {}  # backend -> why it was not used
    device_count: Count = 0
    interval_s: NonNeg = 2.0
    # The path to any peer not listed in ``links`` (a fleet's network default, or this host's
    # fastest interface): big fleets list only their special links. Gbit/s, like NetLink.gbps.
    default_link_gbps: NonNeg | None = None
    default_link_latency_ms: NonNeg | None = None
    # When the publisher (agent, worker) started, seconds since the Unix epoch. ``seq`` restarts
    # at 0 with each epoch, so readers order by (epoch, seq, ts); 0.0 from older writers.
    epoch: Timestamp = 0.0
    # The IP address this host uses to reach the NATS server: the one its peers can dial (engine
    # exports print it; a node id is not a hostname). None from simulated nodes and older agents.
    address: str | None = None


# --- placement -------------------------------------------------------------------------------


class ModelCard(Frozen, frozen=True, forbid_unknown_fields=True):
    """A transformer's architecture, enough to compute every byte the planner needs.

    Unknown fields are refused (a typo such as ``bytes_per_parm`` would otherwise leave the
    default in place and silently change every estimate), and the sizes must agree with each
    other (:meth:`__post_init__`), since the planner divides by them."""

    # Upper bounds far beyond any published model (hidden 25,600, vocab 256k, 384 experts),
    # low enough that every byte count the planner multiplies out stays an exact 64-bit
    # integer for the solver.
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    layers: Annotated[int, Meta(ge=1, le=4096)]
    hidden: Annotated[int, Meta(ge=1, le=65_536)]
    intermediate: Annotated[int, Meta(ge=1, le=262_144)]
    heads: Annotated[int, Meta(ge=1, le=4096)]
    kv_heads: Annotated[int, Meta(ge=1, le=4096)]
    vocab: Annotated[int, Meta(ge=1, le=4_194_304)]
    head_dim: Annotated[int, Meta(ge=1, le=2048)] | None = None
    tied_embeddings: bool = False
    bytes_per_param: Annotated[float, Meta(gt=0.0, le=8.0)] = 2.0
    kv_bytes_per_elem: Annotated[float, Meta(gt=0.0, le=8.0)] = 2.0
    experts: Annotated[int, Meta(ge=1, le=1024)] = 1
    experts_per_token: Annotated[int, Meta(ge=1, le=1024)] = 1
    moe_intermediate: Annotated[int, Meta(ge=1, le=262_144)] | None = None
    attention_bias: bool = False
    params_b: NonNeg | None = None  # published parameter count, billions (documentation)

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError naming the card.
        if self.head_dim is None and self.hidden // self.heads < 1:
            raise ValueError(
                f"heads ({self.heads}) exceed hidden ({self.hidden}): head_dim would be "
                f"{self.hidden // self.heads}; give head_dim or fewer heads"
            )
        if self.kv_heads > self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"kv_heads ({self.kv_heads}) must divide heads ({self.heads}): each key/value "
                "head serves a whole group of query heads"
            )
        if self.experts_per_token > self.experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) exceeds experts ({self.experts})"
            )


Objective = Literal["throughput", "latency"]
SolverMethod = Literal["auto", "cp-sat", "greedy"]
# ``microbatches`` in a request: a number M fixes the schedule; "auto" lets the planner choose
# M; "stages" means one micro-batch per stage, M = min(batch, stages) (vLLM's schedule).
Microbatches = Literal["auto", "stages"] | Annotated[int, Meta(ge=1, le=4096)]


class PlacementRequest(Frozen, frozen=True, forbid_unknown_fields=True):
    model: str | ModelCard
    context_tokens: Annotated[int, Meta(ge=1, le=10_000_000)] = 8192
    batch: Annotated[int, Meta(ge=1, le=4096)] = 1
    objective: Objective = "throughput"
    instance_id: Token | None = None
    dry_run: bool = False
    memory_headroom: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.1
    exclude_nodes: tuple[Token, ...] = ()
    max_stages: Annotated[int, Meta(ge=1)] | None = None
    time_limit_s: Annotated[float, Meta(gt=0.0, le=60.0)] | None = None
    v: Version = SCHEMA_VERSION
    # Added by the planner (additive): "auto" picks the fastest method that proves its plan;
    # "cp-sat" always runs the solver (audits, comparisons); "greedy" never does.
    solver: SolverMethod = "auto"
    # Added with the schedule model (additive): how the batch is split into micro-batches (see
    # Microbatches), and the fewest stages a plan may have (forces a pipeline).
    microbatches: Microbatches = "auto"
    min_stages: Annotated[int, Meta(ge=1)] | None = None
    # Added for healing (additive): re-plan this instance even when its stored plan still
    # stands, keeping stages on the devices they already occupy where the step time allows it
    # (the controller sets it; a dry run with it is how the controller prices a move).
    heal: bool = False
    # How much slower than the best plan (phase 1) a plan may be to move fewer bytes (phase 2).
    move_slack: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.05


class Stage(Frozen, frozen=True):
    node: Token
    device: DeviceRef
    gpu: str
    layer_start: Layer
    layer_end: Layer
    weight_bytes: Bytes
    kv_bytes: Bytes
    bandwidth_gbps: NonNeg
    stage_ms: NonNeg
    hop_ms: NonNeg
    memory_bytes: Bytes = 0  # weights + kv + workspace held on the device
    free_bytes: Bytes = 0  # free memory the device reported when planned
    embeddings: bool = False
    head: bool = False
    # Added for calibration (additive): bandwidth_gbps (and so stage_ms) is what this device
    # achieved running stages, not its datasheet figure derated by utilisation.
    calibrated: bool = False


class Excluded(Frozen, frozen=True):
    device: str
    reason: str


ErrorCode = Literal[
    "invalid_request",
    "unknown_model",
    "no_devices",
    "insufficient_memory",
    "timeout",
    "conflict",
    "internal",
    "unavailable",  # no planner answered (the API's 503): retry later, nothing was planned
    "not_found",  # placement.release: the ledger never had this instance
]


class ErrorInfo(Frozen, frozen=True):
    code: ErrorCode
    message: str


EXCLUDED_LISTED = 100  # PlacementReply.excluded lists at most this many (excluded_total: all)


class PlacementReply(Frozen, frozen=True):
    ok: bool
    instance_id: str | None = None
    generation: Count = 0
    model: str | None = None
    solver: str | None = None
    status: str | None = None
    solve_ms: NonNeg = 0.0
    bottleneck_ms: NonNeg = 0.0
    lower_bound_ms: NonNeg = 0.0
    tokens_per_s: NonNeg = 0.0
    objective: Objective = "throughput"
    context_tokens: Count = 0
    batch: Count = 0
    dry_run: bool = False
    stages: tuple[Stage, ...] = ()
    excluded: tuple[Excluded, ...] = ()
    error: ErrorInfo | None = None
    v: Version = SCHEMA_VERSION
    # Added by the planner (additive): the proven distance to the best bound when the solver
    # stopped at its time limit (0 when optimal), and that bound (>= lower_bound_ms).
    gap_pct: NonNeg | None = None
    bound_ms: NonNeg | None = None
    # Added with the schedule model (additive; DESIGN.md "Planner model"): the batch runs as
    # ``microbatches`` (M) micro-batches of ceil(batch / M) sequences; ``step_ms`` is the step
    # time P(M), the time between two tokens of every sequence, and ``tokens_per_s`` = batch x
    # 1000 / step_ms; ``max_batch`` is the most sequences at ``context_tokens`` the placed
    # memory holds. ``bottleneck_ms`` is the busiest stage's time per micro-batch, max t_s(b)
    # (a component of P, not a rate); ``lower_bound_ms`` and ``bound_ms`` bound step_ms.
    # A stage's ``stage_ms``/``hop_ms`` are t_s(batch)/h_s(batch) (the whole batch as one
    # micro-batch); the last stage's ``hop_ms`` is the return hop of the sampled token ids to
    # the first stage, so with microbatches = 1, step_ms = sum(stage_ms + hop_ms).
    microbatches: Count = 0
    step_ms: NonNeg = 0.0
    max_batch: Count = 0
    # Added for healing (additive): of the plan's weight bytes, how many must be loaded
    # (devices that did not hold them at the previous generation) and how many stay resident.
    bytes_moved: Bytes | None = None
    bytes_kept: Bytes | None = None
    # Added at fleet scale (additive): how many devices were left out in all; ``excluded``
    # lists the first EXCLUDED_LISTED of them (a stale half of 8,000 GPUs made every reply,
    # and the copy the ledger stores, hundreds of kilobytes).
    excluded_total: Count = 0


class ReleaseRequest(Frozen, frozen=True, forbid_unknown_fields=True):
    """Body of ``placement.release``: give an instance's memory back. Idempotent."""

    instance_id: Token
    v: Version = SCHEMA_VERSION


class ReleaseReply(Frozen, frozen=True):
    """``generation`` is the release's own generation (workers unload at it); ``already`` says
    the instance was released before this request and nothing changed."""

    ok: bool
    instance_id: str | None = None
    generation: Count = 0
    released_bytes: Bytes = 0  # memory the ledger no longer promises
    nodes: tuple[str, ...] = ()  # nodes told to unload
    already: bool = False
    error: ErrorInfo | None = None
    v: Version = SCHEMA_VERSION


class ShardAssignment(Frozen, frozen=True):
    """Desired state for one stage of one instance at one generation.

    ``release=True`` says this node holds nothing of the instance at this generation (its
    layers moved elsewhere, or the instance was removed): unload whatever it had.
    """

    instance_id: Token
    generation: Annotated[int, Meta(ge=1)]
    node: Token
    model: str  # catalog name or "hf:<dir>"
    stage: Count = 0
    stage_count: Annotated[int, Meta(ge=1)] = 1
    device: DeviceRef | None = None
    layer_start: Layer = 0
    layer_end: Layer = 0
    layers_total: Count = 0
    weight_bytes: Bytes = 0
    kv_bytes: Bytes = 0
    memory_bytes: Bytes = 0
    embeddings: bool = False
    head: bool = False
    release: bool = False
    ts: Timestamp = 0.0
    v: Version = SCHEMA_VERSION
    # Added (additive): the ledger's name for this generation's plan. Workers and the projector
    # act on an assignment only when its generation and plan_key are the ledger's for the
    # instance (bus.authority), so a stale or forged assignment cannot take an id over.
    plan_key: str = ""


HealthState = Literal["ready", "degraded", "healing", "failed"]


class InstanceHealth(Frozen, frozen=True):
    """The controller's verdict on an instance, on ``placement.health.<instance>``.

    ``generation`` is the generation the verdict was made against (the degraded one, or the one
    being healed to); readers keep the newest verdict by ``(ts, seq)``."""

    instance_id: Token
    generation: Annotated[int, Meta(ge=1)]
    state: HealthState
    ts: Timestamp
    seq: Count = 0
    reason: str | None = None
    v: Version = SCHEMA_VERSION


ShardState = Literal["pending", "loading", "loaded", "reserved", "failed", "unloaded"]


class ShardStatus(Frozen, frozen=True):
    instance_id: Token
    generation: Annotated[int, Meta(ge=1)]
    node: Token
    stage: Count
    state: ShardState
    seq: Count
    ts: Timestamp
    device: DeviceRef | None = None
    bytes_loaded: Bytes = 0
    load_ms: NonNeg = 0.0
    where: str | None = None  # "cuda:0", "host"
    reason: str | None = None
    tensors: Count = 0
    v: Version = SCHEMA_VERSION
    # When the publisher (agent, worker) started, seconds since the Unix epoch. ``seq`` restarts
    # at 0 with each epoch, so readers order by (epoch, seq, ts); 0.0 from older writers.
    epoch: Timestamp = 0.0
    # Added for calibration (additive): a serving stage's measured decode step (batch 1, p50 of
    # its recent steps, compute only) and the bytes such a step reads (weights of its layers,
    # plus the head on the last stage). None/0: nothing measured.
    step_ms: NonNeg | None = None
    step_bytes: Bytes = 0
    # Added for compute calibration (additive): the sequences in the timed steps (1 from older
    # writers, which timed batch 1 only), the FLOPs such a step costs (planner.profile's count)
    # and what ran it ("numpy-cpu", "torch-cuda:0"; None from older writers). A step that ran on
    # the host CPU for a GPU device (a simulated fleet) is not that GPU's speed: the projector
    # keeps it out of the device's calibration (projector.calibration).
    step_rows: Annotated[int, Meta(ge=1)] = 1
    step_flops: NonNeg = 0.0
    executor: str | None = None
    # Added for link calibration (additive): the p50 crossing from this stage to the next one in
    # those steps (request to reply, less the compute and crossings downstream reported: NATS,
    # framing, waking both processes), ms. None: the last stage, or nothing measured.
    hop_ms: NonNeg | None = None


# --- running a placed model (core request-reply on pipeline.<instance>.<stage>) ---------------

SeqId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class StageEntry(Frozen, frozen=True):
    """``count`` new tokens of one sequence at positions ``start ..``; sampling settings are
    read by the last stage only."""

    seq_id: SeqId
    start: Annotated[int, Meta(ge=0, le=10_000_000)]
    count: Annotated[int, Meta(ge=1, le=1_000_000)]
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0


class StageRequest(Frozen, frozen=True):
    """One step through the pipeline from stage ``stage`` on. The first stage takes ``tokens``
    (int32 little-endian, one per row), later stages ``hidden`` (float32 little-endian,
    rows x hidden). ``op="release"`` drops the entries' KV caches at this stage only."""

    instance_id: Token
    stage: Count
    entries: tuple[StageEntry, ...]
    op: Literal["forward", "release"] = "forward"
    tokens: bytes = b""
    hidden: bytes = b""
    sample: bool = True  # last stage: draw a token per entry (False for inner prefill chunks)
    want_logits: bool = False  # last stage: also return the logits (float32, entries x vocab)
    deadline_ms: Annotated[float, Meta(gt=0.0, le=3_600_000.0)] = 10_000.0  # budget left
    v: Version = SCHEMA_VERSION


class StageReply(Frozen, frozen=True):
    """The pipeline's answer from the stage asked to the end: sampled tokens, or an error
    naming the stage that failed. ``stage_ms`` is each stage's compute time, in stage order."""

    ok: bool
    tokens: tuple[int, ...] = ()
    logits: bytes = b""
    stage_ms: tuple[NonNeg, ...] = ()
    # Each crossing's transport time as the sending stage saw it (request to decoded reply,
    # less everything the downstream stages reported), crossing k -> k+1 at index k.
    hop_ms: tuple[NonNeg, ...] = ()
    failed_stage: Count | None = None
    error: ErrorInfo | None = None
    v: Version = SCHEMA_VERSION


# --- materialised state in the cluster_state KV bucket ----------------------------------------


class DeviceState(Frozen, frozen=True):
    """Value of ``devices.<node>.<index>``: the newest sample plus liveness."""

    sample: DeviceSample
    online: bool
    last_seen: Timestamp
    offline_reason: str | None = None
    v: Version = SCHEMA_VERSION
    # Stream time of the node's graceful-shutdown heartbeat, when one is newer than this
    # device's last sample (then the device is offline until a later sample arrives).
    shutdown_at: Timestamp | None = None
    # Added for calibration (additive): memory bandwidth the device achieved running stages
    # (GB/s, from ShardStatus.step_bytes / step_ms), the median of the recent measurements kept
    # in ``measured_gbps_samples``; None until there are enough of them to be robust.
    measured_gbps: NonNeg | None = None
    measured_gbps_samples: tuple[NonNeg, ...] = ()
    # Added for compute calibration (additive): effective TFLOPS the device achieved in decode
    # steps of several sequences (ShardStatus.step_flops / step_ms), median of the recent ones;
    # the planner plans t = max(read / measured_gbps, flops / measured_tflops). None until
    # enough samples. ``host_substitute_steps`` counts step reports that ran on a host CPU
    # standing in for this (GPU) device and were therefore kept out of both figures.
    measured_tflops: NonNeg | None = None
    measured_tflops_samples: tuple[NonNeg, ...] = ()
    host_substitute_steps: Count = 0


class NodeState(Frozen, frozen=True):
    """Value of ``nodes.<node>``."""

    heartbeat: NodeHeartbeat
    online: bool
    last_seen: Timestamp
    offline_reason: str | None = None
    v: Version = SCHEMA_VERSION
    # Stream time of the latest graceful-shutdown heartbeat (kept after the node is back, so a
    # device sample older than it still reads as "node shut down").
    shutdown_at: Timestamp | None = None
    # Added for link calibration (additive): by peer node, the stage crossing from this node to
    # it that batch-1 steps measured (ShardStatus.hop_ms), the median of the recent ones kept in
    # ``measured_hop_samples``; the planner plans that link at this latency. A peer appears once
    # there are enough samples to be robust.
    measured_hop_ms: dict[Token, NonNeg] = {}
    measured_hop_samples: dict[Token, tuple[NonNeg, ...]] = {}


class StageState(Frozen, frozen=True):
    stage: Count
    node: Token
    device: DeviceRef | None
    layer_start: Layer
    layer_end: Layer
    weight_bytes: Bytes = 0
    memory_bytes: Bytes = 0
    state: ShardState = "pending"
    reason: str | None = None
    bytes_loaded: Bytes = 0
    load_ms: NonNeg = 0.0
    where: str | None = None
    status_seq: Count = 0
    status_epoch: Timestamp = 0.0
    status_ts: Timestamp | None = None  # None: no status reported yet


InstanceOverall = Literal[
    "pending", "loading", "loaded", "reserved", "degraded", "failed", "released"
]


class InstanceState(Frozen, frozen=True):
    """Value of ``instances.<id>``: the newest generation's assignment with each stage's status."""

    instance_id: Token
    model: str
    generation: Annotated[int, Meta(ge=1)]
    stage_count: Annotated[int, Meta(ge=1)]
    stages: tuple[StageState, ...]
    state: InstanceOverall
    updated: Timestamp
    v: Version = SCHEMA_VERSION
    # Nodes told by a release=True assignment of this generation to hold nothing.
    released_nodes: tuple[Token, ...] = ()
    # Added (additive): the controller's newest verdict (InstanceHealth), kept across
    # generations, since a heal spans the old generation and the new one.
    health: HealthState | None = None
    health_reason: str | None = None
    health_generation: Count = 0
    health_ts: Timestamp | None = None
    health_seq: Count = 0
