"""The worker's settings from the environment: a throttle on shard loads and how tensors are read.

Why its own module: they are read once where a worker is started (``run_worker``), and a bad
value must be named and ignored, never fatal; that policy is easier to see and test alone."""

from __future__ import annotations

import logging
import os

from shardplane.agents.loader import DEFAULT_READ_MODE, ReadMode
from shardplane.bus.envnum import positive_float

# The worker's logger: these lines keep the name they had before this module was split off.
log = logging.getLogger("shardplane.agents.worker")

LOAD_LIMIT_ENV = "SHARDPLANE_LOAD_LIMIT_MBPS"
READ_MODE_ENV = "SHARDPLANE_LOAD_READ"


def read_mode_from_env() -> ReadMode:
    """``SHARDPLANE_LOAD_READ``: ``pread`` (default) or ``mmap``."""
    raw = os.environ.get(READ_MODE_ENV, "").strip().lower()
    if raw == "mmap":
        return "mmap"
    if raw in ("", "pread"):
        return "pread"
    log.warning("%s=%r is neither pread nor mmap; using %s", READ_MODE_ENV, raw, DEFAULT_READ_MODE)
    return DEFAULT_READ_MODE


def load_limit_from_env() -> float | None:
    """``SHARDPLANE_LOAD_LIMIT_MBPS`` in bytes a second; None (no throttle) when unset or bad."""
    try:
        mbps = positive_float(LOAD_LIMIT_ENV, "MB/s")
    except ValueError as exc:
        log.warning("%s; loads are not throttled", exc)
        return None
    return None if mbps is None else mbps * 1e6
