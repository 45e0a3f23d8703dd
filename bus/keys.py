"""KV key layout: the only place a key of a bucket is spelled or taken apart.

The projector writes ``cluster_state`` and every reader (planner, API, CLI, tests) reads it; the
planners write the ledger that workers and the projector read. A key's shape is therefore part
of the contract, and a reader that splits ``devices.<node>.<index>`` by hand would drift from the
writer the day the layout changes. Builders and parsers live side by side so that each layout
is written once.
"""

from __future__ import annotations

from typing import Literal

# cluster_state (written by the projector only)
DEVICES = "devices"  # devices.<node>.<index> -> DeviceState
NODES = "nodes"  # nodes.<node> -> NodeState
INSTANCES = "instances"  # instances.<instance> -> InstanceState

Kind = Literal["device", "node", "instance"]
KIND_OF_PREFIX: dict[str, Kind] = {DEVICES: "device", NODES: "node", INSTANCES: "instance"}

# placement_ledger (written by the planners)
# The ledger's one document: every instance's promise and its current generation.
LEDGER_RESERVATIONS = "reservations"
PLANS = "plans"  # plans.<instance>.<generation>.<nonce> -> PlacementReply

# lease buckets: the one key a leader holds
LEASE = "leader"


def device_key(node: str, index: int) -> str:
    return f"{DEVICES}.{node}.{index}"


def node_key(node: str) -> str:
    return f"{NODES}.{node}"


def instance_key(instance: str) -> str:
    return f"{INSTANCES}.{instance}"


def plan_key(instance_id: str, generation: int, nonce: str) -> str:
    return f"{PLANS}.{instance_id}.{generation}.{nonce}"


def prefix(key: str) -> str:
    """The first token: ``devices``, ``nodes``, ``instances``, ``plans``, ..."""
    return key.partition(".")[0]


def kind_of(key: str) -> Kind | None:
    """What a ``cluster_state`` key holds; None for a key outside the layout."""
    return KIND_OF_PREFIX.get(prefix(key))


def device_ref(key: str) -> str | None:
    """``devices.<node>.<index>`` -> ``<node>/<index>`` (how plans name a device); None for
    any other key. A node name holds no dot (bus.ids), so the index is the last token."""
    head, _, rest = key.partition(".")
    node, _, index = rest.rpartition(".")
    if head != DEVICES or not node:
        return None
    return f"{node}/{index}"


def key_of_ref(ref: str) -> str:
    """``<node>/<index>`` -> ``devices.<node>.<index>`` (the inverse of ``device_ref``)."""
    node, _, index = ref.rpartition("/")
    return f"{DEVICES}.{node}.{index}"


def node_of(key: str) -> str | None:
    """The node a device or node key is about; None for anything else (instances)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == DEVICES:
        return parts[1]
    if len(parts) == 2 and parts[0] == NODES:
        return parts[1]
    return None
