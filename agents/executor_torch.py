"""The stage executor in torch: the same arithmetic as ``agents.executor.NumpyStage``, on a GPU
(CUDA or ROCm) where the stage's device is one, on the CPU otherwise. The logic both share
(cache, checks, a step's order, a layer's wiring) is ``agents.executor.StageCore``; this module
gives it torch's array operations.

Why a second backend: numpy is what runs everywhere (CI, the simulated demo fleet), but a real
GPU reads weights an order of magnitude faster than a host CPU, and the planner's predictions
for a GPU fleet only meet a measurement when the stage runs on that GPU. Callers see the same
``StageBackend``: numpy arrays in (token ids or fp32 hidden states), numpy arrays out (hidden
states to send on, or logits to sample from). Sampling stays on the host with
``agents.executor.sample``, so a seed draws the same tokens whichever backend computed the
logits.

Precision: fp32 throughout, weights included (the loader's bf16 is widened as numpy widens it),
so torch-CPU logits agree with numpy's to float rounding. Within this backend, a layer's
arithmetic does not depend on where the stage boundaries are and hidden states cross stages as
exact fp32 bytes, so any split gives bitwise-identical logits on one device.

torch is an optional extra (``pip install 'shardplane[torch]'``); this module imports it at
load time, and ``agents.backends`` only imports this module when torch is installed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from shardplane.agents.executor import (
    F32,
    Entry,
    ModelConfig,
    StageCore,
    as_f32,
    check_layers,
)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = torch.mean(x * x, dim=-1, keepdim=True)
    return (x / torch.sqrt(var + eps)) * weight


def _cap_cpu_threads() -> None:
    """On the CPU, torch's intra-op pool defaults to every core; a decode step is a few small
    matmuls, and with the event loop, NATS and other stages on the same host, each parallel
    region waits for a descheduled thread (measured on this 2-core machine under load: 1.47 s
    per SmolLM2 token with 2 threads, 0.08 s with 1). So unless the operator set
    ``OMP_NUM_THREADS`` (which torch honours), a CPU stage uses half the cores."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))


@dataclass
class TorchStage(StageCore[torch.Tensor]):
    """One stage of a Llama-family model in torch fp32 on ``device`` ("cpu", "cuda:0", ...)."""

    device: torch.device

    @property
    def name(self) -> str:
        """What ran, for statuses and logs: ``torch-cpu``, ``torch-cuda:0``."""
        return f"torch-{self.device}"

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        tensors: Mapping[str, Any],
        *,
        layer_start: int,
        layer_end: int,
        embeddings: bool,
        head: bool,
        device: str = "cpu",
        dtypes: Mapping[str, str] | None = None,
    ) -> TorchStage:
        check_layers(config, layer_start, layer_end)
        types = dtypes or {}
        dev = torch.device(device)
        if dev.type == "cpu":
            _cap_cpu_threads()

        def read(name: str) -> torch.Tensor:
            t = tensors[name]
            if isinstance(t, torch.Tensor):
                return t.detach().to(dev, torch.float32).contiguous()
            return torch.from_numpy(as_f32(np.asarray(t), types.get(name)).copy()).to(dev)

        stage = cls(config, layer_start, layer_end, embeddings, head, dev)
        stage._load(tensors, read, torch.cat)
        return stage

    def forward(
        self, entries: Sequence[Entry], x: npt.NDArray[Any], *, all_rows: bool = False
    ) -> F32:
        with torch.inference_mode():
            return self._step(entries, x, all_rows).cpu().numpy()

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def _empty(self, rows: int, cols: int) -> torch.Tensor:
        return torch.empty((rows, cols), device=self.device)

    def _put(self, array: F32) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def _adopt(self, hidden: F32) -> torch.Tensor:
        # Frames arrive as read-only buffers; torch wants a writable array to share.
        return torch.from_numpy(np.array(hidden, dtype=np.float32)).to(self.device)

    def _take(self, array: torch.Tensor, rows: npt.NDArray[Any]) -> torch.Tensor:
        return array[torch.from_numpy(rows.astype(np.int64)).to(self.device)]

    def _swap01(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, weight, self.config.rms_eps)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def _swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(gate) * up

    def _attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
    ) -> torch.Tensor:
        c = self.config
        n = q.shape[0]
        total, rep = start + n, c.heads // c.kv_heads
        qg = q.reshape(n, c.kv_heads, rep, c.head_dim).permute(1, 2, 0, 3)
        scores = qg.reshape(c.kv_heads, rep * n, c.head_dim) @ keys.transpose(1, 2)
        scores = (scores * (1.0 / math.sqrt(c.head_dim))).reshape(c.kv_heads, rep, n, total)
        if n > 1:
            pos = torch.arange(total, device=self.device)
            causal = pos[None, :] > (start + torch.arange(n, device=self.device))[:, None]
            scores = scores.masked_fill(causal, -math.inf)
        ctx = torch.softmax(scores, dim=-1).reshape(c.kv_heads, rep * n, total) @ values
        return ctx.reshape(c.kv_heads, rep, n, c.head_dim).permute(2, 0, 1, 3).reshape(n, -1)
