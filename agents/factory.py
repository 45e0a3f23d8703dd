"""Choose a node's backend: NVML, then ROCm SMI, then the configured simulated node, then none.

Never raises: each backend that cannot be used is skipped with a one-line reason (logged once,
and carried in the node heartbeat's ``skipped``), and with nothing left the node still
heartbeats with zero devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from shardplane.agents.backend import Backend, BackendUnavailable, NoDevices

log = logging.getLogger(__name__)


class Selection(msgspec.Struct, frozen=True, kw_only=True):
    backend: Backend
    skipped: dict[str, str]


Opener = Callable[[str], Backend]


def _open_nvml(node: str) -> Backend:
    from shardplane.agents.nvml import open_nvml

    return open_nvml(node)


def _open_rocm(node: str) -> Backend:
    from shardplane.agents.rocm import open_rocm

    return open_rocm(node)


def select_backend(
    node: str,
    simulated: Backend | None = None,
    *,
    openers: tuple[tuple[str, Opener], ...] | None = None,
) -> Selection:
    """The first backend that opens and sees at least one device (or the simulated one)."""
    chain = openers if openers is not None else (("nvml", _open_nvml), ("rocm", _open_rocm))
    skipped: dict[str, str] = {}
    for name, opener in chain:
        try:
            backend = opener(node)
        except BackendUnavailable as exc:
            skipped[name] = str(exc)
        except Exception as exc:  # a broken library must not stop the agent
            skipped[name] = f"{type(exc).__name__}: {exc}"
        else:
            if backend.device_count() > 0:
                _log_skipped(skipped, backend.name)
                return Selection(backend=backend, skipped=skipped)
            skipped[name] = "initialised, but it sees no devices"
            backend.close()
    if simulated is not None:
        _log_skipped(skipped, simulated.name)
        return Selection(backend=simulated, skipped=skipped)
    skipped["sim"] = "no fleet file given"
    _log_skipped(skipped, "none")
    return Selection(backend=NoDevices(), skipped=skipped)


def _log_skipped(skipped: dict[str, str], chosen: str) -> None:
    for name, reason in skipped.items():
        log.info("GPU backend %s skipped: %s", name, reason)
    if chosen == "none":
        log.warning("no GPU backend: this node heartbeats with zero devices")
    else:
        log.info("GPU backend: %s", chosen)
