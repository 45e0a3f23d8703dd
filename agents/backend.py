"""What a GPU backend gives the collector, and small helpers every backend shares."""

from __future__ import annotations

import logging
from typing import Protocol

from shardplane.bus.errors import AgentError
from shardplane.bus.messages import DeviceSample


class BackendUnavailable(AgentError):
    """A backend that cannot serve this host; ``str()`` is the reason, for the heartbeat."""


class Backend(Protocol):
    """One node's devices. ``read`` never raises for a single field or device: a field that
    cannot be read is None (and named in ``unsupported``), a lost device is ``present=False``.

    Samples come back with ``seq=0``; the collector owns the per-device sequence numbers."""

    name: str  # "nvml" | "rocm" | "sim" | "none"

    @property
    def interconnect(self) -> str | None: ...

    def device_count(self) -> int: ...

    def read(
        self, ts: float, *, temperature: bool = True, power: bool = True
    ) -> list[DeviceSample]: ...

    def hold(self, index: int, delta_bytes: int) -> None:
        """Memory the shard worker holds on a device (reserved or loaded shards): a simulated
        device reports it as used; real devices measure their own memory and ignore it."""
        ...

    def close(self) -> None: ...


class NoDevices:
    """No GPU library answered: the node still heartbeats, with zero devices."""

    name = "none"

    @property
    def interconnect(self) -> str | None:
        return None

    def device_count(self) -> int:
        return 0

    def read(
        self, ts: float, *, temperature: bool = True, power: bool = True
    ) -> list[DeviceSample]:
        return []

    def hold(self, index: int, delta_bytes: int) -> None:
        return None

    def close(self) -> None:
        return None


class LogOnce:
    """Logs each (device, field, reason) once: a field that is NotSupported stays so, and
    repeating it every 2 s would drown the log."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: set[tuple[object, ...]] = set()

    def __call__(
        self, key: tuple[object, ...], message: str, *args: object, level: int = logging.WARNING
    ) -> None:
        if key in self._seen:
            return
        self._seen.add(key)
        self._log.log(level, message, *args)

    def forget(self, key: tuple[object, ...]) -> None:
        self._seen.discard(key)


def theoretical_bandwidth_gbps(
    bus_width_bits: int | None, max_mem_clock_mhz: float | None
) -> float | None:
    """Peak memory bandwidth in GB/s: bus width x max memory clock x 2 (double data rate) / 8.

    NVML reports the HBM clock for HBM parts and the effective GDDR clock / 2 for GDDR parts, so
    the same formula holds for both (H100: 5120 b x 2619 MHz -> 3352 GB/s)."""
    if not bus_width_bits or not max_mem_clock_mhz or bus_width_bits <= 0 or max_mem_clock_mhz <= 0:
        return None
    return round(bus_width_bits * max_mem_clock_mhz * 2 / 8 / 1000, 1)
