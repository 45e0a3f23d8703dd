"""Subject builders: the only place subject strings are spelled (KV keys: bus.keys)."""

from __future__ import annotations

TELEMETRY_GPU = "telemetry.gpu"
TELEMETRY_NODE = "telemetry.node"
PLACEMENT_REQUEST = "placement.request"
PLACEMENT_ASSIGNED = "placement.assigned"
PLACEMENT_RELEASE = "placement.release"  # client <-> planner: ReleaseRequest / ReleaseReply
PLACEMENT_HEALTH = "placement.health"  # controller -> projector: InstanceHealth (PLACEMENTS)
SHARD_STATUS = "shard.status"
DEADLETTER = "deadletter"
PIPELINE = "pipeline"  # hidden states stage to stage (core request-reply, not JetStream)
SIM_FAULT = "sim.fault"  # fault injection by command, simulated nodes only (core request-reply)


def gpu_sample(node: str, index: int) -> str:
    return f"{TELEMETRY_GPU}.{node}.{index}"


def node_heartbeat(node: str) -> str:
    return f"{TELEMETRY_NODE}.{node}"


def assigned(node: str) -> str:
    return f"{PLACEMENT_ASSIGNED}.{node}"


def placement_health(instance: str) -> str:
    return f"{PLACEMENT_HEALTH}.{instance}"


def shard_status(node: str, instance: str) -> str:
    return f"{SHARD_STATUS}.{node}.{instance}"


def deadletter(source_subject: str) -> str:
    return f"{DEADLETTER}.{source_subject}"


def sim_fault(node: str) -> str:
    return f"{SIM_FAULT}.{node}"


def pipeline(instance: str, stage: int) -> str:
    """Where stage ``stage`` of ``instance`` takes its input (and answers with the output of
    the rest of the pipeline)."""
    return f"{PIPELINE}.{instance}.{stage}"


SIM_FAULT_ANY = sim_fault("*")  # what an agent process simulating several nodes subscribes to
