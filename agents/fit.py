"""Whether a device can hold what an assignment asks of it, and which of the checkpoint's tensors
the stage needs: pure functions of the assignment.

Why its own module: the worker refuses an assignment that cannot fit (the planner checked, but
an assignment is only as good as its sender), and security tests call the same check without a
bus."""

from __future__ import annotations

from shardplane.agents import reconcile as rc
from shardplane.agents.loader import StageSpec
from shardplane.bus.messages import ShardAssignment

GIB = 1024**3


def device_index(assignment: ShardAssignment) -> int:
    """The device's index from ``<node>/<index>``; a stage without a device is on device 0."""
    if assignment.device is None:
        return 0
    return int(assignment.device.rpartition("/")[2])


def misfit(assignment: ShardAssignment, total_bytes: int | None, held_elsewhere: int) -> str | None:
    """Why the device cannot hold what ``assignment`` asks for, or None. The planner checked
    this already; the worker checks again, since an assignment is only as good as its sender
    and a device's memory is the one thing it can measure itself."""
    need = rc.hold_bytes(assignment)
    if total_bytes is None or need + held_elsewhere <= total_bytes:
        return None
    return (
        f"the assignment needs {need / GIB:.2f} GiB on device {device_index(assignment)}, which "
        f"has {total_bytes / GIB:.2f} GiB in total ({held_elsewhere / GIB:.2f} GiB already held "
        "by other stages): refused"
    )


def spec_of(assignment: ShardAssignment) -> StageSpec:
    return StageSpec(
        layer_start=assignment.layer_start,
        layer_end=assignment.layer_end,
        embeddings=assignment.embeddings,
        head=assignment.head,
    )
