"""Small typed ids. Node and instance ids are NATS subject tokens, so they are validated once here."""

from __future__ import annotations

import re
import socket
from typing import NewType

from shardplane.bus.errors import BusError

NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)
DeviceId = NewType("DeviceId", str)  # "<node>/<index>", the human address of a GPU

TOKEN_PATTERN = r"^[a-z0-9_-]{1,64}$"
_TOKEN = re.compile(TOKEN_PATTERN)


class InvalidId(BusError, ValueError):
    pass


def node_id(value: str) -> NodeId:
    if not _TOKEN.match(value):
        raise InvalidId(
            f"node id {value!r} is not a subject token (lowercase [a-z0-9_-], 1-64 chars)"
        )
    return NodeId(value)


def instance_id(value: str) -> InstanceId:
    if not _TOKEN.match(value):
        raise InvalidId(
            f"instance id {value!r} is not a subject token (lowercase [a-z0-9_-], 1-64 chars)"
        )
    return InstanceId(value)


def slug(value: str, limit: int = 64) -> str:
    """Lowercase a free-form name into a subject token ("Rig A.local" -> "rig-a-local")."""
    token = re.sub(r"[^a-z0-9_-]+", "-", value.lower()).strip("-")
    return token[:limit] or "node"


def node_id_from_hostname(hostname: str | None = None) -> NodeId:
    return NodeId(slug(hostname or socket.gethostname()))


def device_id(node: str, index: int) -> DeviceId:
    return DeviceId(f"{node}/{index}")


def split_device_id(device: str) -> tuple[NodeId, int]:
    node, _, index = device.rpartition("/")
    if not node or not index.isdigit():
        raise InvalidId(f"device id {device!r} is not '<node>/<index>'")
    return node_id(node), int(index)
