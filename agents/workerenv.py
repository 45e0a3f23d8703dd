"""The worker's settings from the environment: a throttle on shard loads and how tensors are read.

Why its own module: they are read once where a worker is started (``run_worker``), and a bad
value must be named and ignored, never fatal; that policy is easier to see and test alone."""

from __future__ import annotations

import logging
import os

from shardplane.agents.loader import DEFAULT_READ_MODE, ReadMode

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
    raw = os.environ.get(LOAD_LIMIT_ENV, "").strip()
    if not raw:
        return None
    try:
        mbps = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number of MB/s; loads are not throttled", LOAD_LIMIT_ENV, raw)
        return None
    if mbps <= 0:
        log.warning("%s=%r must be positive; loads are not throttled", LOAD_LIMIT_ENV, raw)
        return None
    return mbps * 1e6
