"""The projector's leader lease: the shared mechanism of ``bus.lease`` on the bucket
``projector_lease`` (re-exported here, where the projector and its tests have always found it)."""

from __future__ import annotations

from shardplane.bus.lease import (
    DEFAULT_LEASE_TTL_S,
    LEASE_BUCKET,
    LEASE_KEY,
    STANDBY_POLL_S,
    Lease,
    holder_id,
)

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "LEASE_BUCKET",
    "LEASE_KEY",
    "STANDBY_POLL_S",
    "Lease",
    "holder_id",
]
