"""Which executor runs a stage: numpy (everywhere) or torch (where installed and chosen).

Why a rule and not a flag per call site: the worker, ``stagerun`` and the tests all build
stages, and an operator must be able to say once, for a whole process, what runs. The choice
is ``SHARDPLANE_BACKEND``:

- ``numpy`` (default): ``agents.executor.NumpyStage`` on the host CPU, whatever the device.
  Always installed; what CI and the simulated demo fleet run.
- ``torch``: ``agents.executor_torch.TorchStage``, on the stage's GPU when the loader put the
  weights on one (CUDA or ROCm, both ``cuda:N`` to torch), on the CPU otherwise. Asking for it
  without torch installed is an error that says so (a worker that silently fell back would be
  measured and calibrated as something it is not).
- ``auto``: torch on a real GPU, numpy otherwise (torch-CPU is no faster than numpy for decode
  here, and numpy is the reference).

What ran is in the backend's ``name`` (``numpy-cpu``, ``torch-cuda:0``); the worker reports it
with each step timing (``ShardStatus.executor``), which is how calibration tells a step run on
the device from one run on a host stand-in (``projector.calibration``).

A numpy stage caps this process's BLAS threads (``agents.blasthreads``) when it is built.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any, Literal

from shardplane.agents.blasthreads import cap_blas_threads
from shardplane.agents.executor import ExecutorError, ModelConfig, NumpyStage, StageBackend

BACKEND_ENV = "SHARDPLANE_BACKEND"
Kind = Literal["numpy", "torch"]
KINDS = ("numpy", "torch", "auto")


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def gpu_where(tensors: Mapping[str, Any]) -> str | None:
    """The GPU the loader put a stage's weights on (``cuda:0``), None when they are host arrays."""
    for t in tensors.values():
        device = getattr(t, "device", None)
        kind = getattr(device, "type", None)
        if kind == "cuda":
            return str(device)
    return None


def choose(requested: str | None, gpu: str | None) -> tuple[Kind, str]:
    """(backend, torch device) for a stage whose weights are on ``gpu`` (None: host memory).
    ``requested`` None reads ``SHARDPLANE_BACKEND`` (default numpy)."""
    want = (requested or os.environ.get(BACKEND_ENV) or "numpy").strip().lower()
    if want not in KINDS:
        raise ExecutorError(
            f"{BACKEND_ENV}={want!r} is not a backend; choose one of {', '.join(KINDS)}"
        )
    if want == "numpy":
        return "numpy", "cpu"
    if not torch_installed():
        if want == "auto":
            return "numpy", "cpu"
        raise ExecutorError(
            f"{BACKEND_ENV}=torch but torch is not installed (pip install 'shardplane[torch]')"
        )
    if want == "auto" and gpu is None:
        return "numpy", "cpu"
    return "torch", gpu or "cpu"


def build_stage(
    config: ModelConfig,
    tensors: Mapping[str, Any],
    *,
    layer_start: int,
    layer_end: int,
    embeddings: bool,
    head: bool,
    backend: str | None = None,
) -> StageBackend:
    """The stage's executor, by ``choose``. Torch tensors already on a GPU stay there; numpy
    gets host arrays."""
    kind, device = choose(backend, gpu_where(tensors))
    bounds: dict[str, Any] = {
        "layer_start": layer_start,
        "layer_end": layer_end,
        "embeddings": embeddings,
        "head": head,
    }
    if kind == "torch":
        from shardplane.agents.executor_torch import TorchStage

        return TorchStage.build(config, tensors, device=device, **bounds)
    cap_blas_threads()
    return NumpyStage.build(config, {n: host_array(t) for n, t in tensors.items()}, **bounds)


def host_array(tensor: Any) -> Any:
    """A loaded tensor as a host numpy array (torch tensors when the loader used a GPU)."""
    if hasattr(tensor, "cpu") and hasattr(tensor, "float"):
        return tensor.float().cpu().numpy()
    return tensor


def backend_name(backend: StageBackend) -> str:
    """What runs a stage, for statuses and replies (``numpy-cpu``, ``torch-cuda:0``)."""
    return str(getattr(backend, "name", "numpy-cpu"))
