"""The executor backends a test runs over: numpy always, torch where it is installed (skipped,
with the reason, where it is not: ``make install`` adds it when its wheel is on this disk)."""

from __future__ import annotations

import pytest

from shardplane.agents.backends import torch_installed

NO_TORCH = "torch is not installed: the torch backend's tests skip (make install adds it)"
BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param(
        "torch", id="torch", marks=pytest.mark.skipif(not torch_installed(), reason=NO_TORCH)
    ),
]
