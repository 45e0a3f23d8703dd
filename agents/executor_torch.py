"""The stage executor in torch: the same arithmetic as ``agents.executor.NumpyStage``, on a GPU
(CUDA or ROCm) where the stage's device is one, on the CPU otherwise.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from shardplane.agents.executor import (
    F32,
    MIN_CACHE,
    Entry,
    ExecutorError,
    LayerWeights,
    ModelConfig,
    as_f32,
    cache_need,
    inv_frequencies,
    read_head,
    read_layer,
)


@dataclass
class _Cache:
    k: torch.Tensor  # [layers, kv_heads, capacity, head_dim] on the stage's device
    v: torch.Tensor
    length: int = 0


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = torch.mean(x * x, dim=-1, keepdim=True)
    return (x / torch.sqrt(var + eps)) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _cap_cpu_threads() -> None:
    """On the CPU, torch's intra-op pool defaults to every core; a decode step is a few small
    matmuls, and with the event loop, NATS and other stages on the same host, each parallel
    region waits for a descheduled thread (measured on this 2-core machine under load: 1.47 s
    per SmolLM2 token with 2 threads, 0.08 s with 1). So unless the operator set
    ``OMP_NUM_THREADS`` (which torch honours), a CPU stage uses half the cores."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))


@dataclass
class TorchStage:
    """One stage of a Llama-family model in torch fp32 on ``device`` ("cpu", "cuda:0", ...)."""

    config: ModelConfig
    layer_start: int
    layer_end: int
    embeddings: bool
    head: bool
    device: torch.device
    _layers: list[LayerWeights[torch.Tensor]] = field(default_factory=lambda: [])
    _embed: torch.Tensor | None = None
    _final_norm: torch.Tensor | None = None
    _head: torch.Tensor | None = None
    _inv: npt.NDArray[np.float64] | None = None
    _caches: dict[str, _Cache] = field(default_factory=lambda: {})

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
        if not 0 <= layer_start <= layer_end <= config.layers:
            raise ExecutorError(
                f"layer range [{layer_start}, {layer_end}) is outside the model's "
                f"{config.layers} layers"
            )
        types = dtypes or {}
        dev = torch.device(device)
        if dev.type == "cpu":
            _cap_cpu_threads()

        def get(name: str) -> torch.Tensor:
            if name not in tensors:
                raise ExecutorError(f"tensor {name} missing from the stage's weights")
            t = tensors[name]
            if isinstance(t, torch.Tensor):
                return t.detach().to(dev, torch.float32).contiguous()
            return torch.from_numpy(as_f32(np.asarray(t), types.get(name)).copy()).to(dev)

        stage = cls(config, layer_start, layer_end, embeddings, head, dev)
        for i in range(layer_start, layer_end):
            stage._layers.append(read_layer(get, torch.cat, i, config.attention_bias))
        if embeddings:
            stage._embed = get("model.embed_tokens.weight")
        if head:
            stage._final_norm, stage._head = read_head(get, tensors, stage._embed)
        stage._inv = inv_frequencies(config)
        return stage

    def read_bytes(self) -> int:
        total = sum(
            sum(t.numel() * 4 for t in (w.in_norm, w.qkv, w.o, w.post_norm, w.gate_up, w.down))
            + (0 if w.qkv_bias is None else w.qkv_bias.numel() * 4)
            for w in self._layers
        )
        if self.head and self._head is not None and self._final_norm is not None:
            total += (self._head.numel() + self._final_norm.numel()) * 4
        return total

    # --- cache ------------------------------------------------------------------------------

    def sequences(self) -> list[str]:
        return sorted(self._caches)

    def cached_positions(self, seq_id: str) -> int:
        cache = self._caches.get(seq_id)
        return 0 if cache is None else cache.length

    def release(self, seq_id: str) -> bool:
        return self._caches.pop(seq_id, None) is not None

    def _cache_for(self, entry: Entry) -> _Cache:
        c = self.config
        cache = self._caches.get(entry.seq_id)
        have = 0 if cache is None else cache.length
        need = cache_need(entry, have, (self.layer_start, self.layer_end), c.max_positions)
        if cache is None or need > cache.k.shape[2]:
            cap = max(MIN_CACHE, 1 << (need - 1).bit_length())
            shape = (len(self._layers), c.kv_heads, cap, c.head_dim)
            k = torch.zeros(shape, dtype=torch.float32, device=self.device)
            v = torch.zeros(shape, dtype=torch.float32, device=self.device)
            if cache is not None:
                k[:, :, : cache.length] = cache.k[:, :, : cache.length]
                v[:, :, : cache.length] = cache.v[:, :, : cache.length]
            cache = _Cache(k=k, v=v, length=have)
            self._caches[entry.seq_id] = cache
        return cache

    # --- arithmetic -------------------------------------------------------------------------

    def _rope(self, positions: npt.NDArray[np.int64]) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float64 on the host, as the numpy executor computes them: the rounding of
        # cos/sin is then identical in both backends.
        assert self._inv is not None
        freqs = np.outer(positions.astype(np.float64), self._inv)
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos = torch.from_numpy(np.cos(emb).astype(np.float32)).to(self.device)
        sin = torch.from_numpy(np.sin(emb).astype(np.float32)).to(self.device)
        return cos, sin

    def _attend(
        self,
        li: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        entries: Sequence[Entry],
        caches: list[_Cache],
    ) -> torch.Tensor:
        c = self.config
        rep = c.heads // c.kv_heads
        scale = 1.0 / math.sqrt(c.head_dim)
        out = torch.empty((q.shape[0], c.heads * c.head_dim), device=self.device)
        row = 0
        for entry, cache in zip(entries, caches, strict=True):
            n, s = entry.count, entry.start
            cache.k[li, :, s : s + n] = k[row : row + n].transpose(0, 1)
            cache.v[li, :, s : s + n] = v[row : row + n].transpose(0, 1)
            total = s + n
            keys, values = cache.k[li, :, :total], cache.v[li, :, :total]
            qg = q[row : row + n].reshape(n, c.kv_heads, rep, c.head_dim).permute(1, 2, 0, 3)
            scores = (qg.reshape(c.kv_heads, rep * n, c.head_dim) @ keys.transpose(1, 2)) * scale
            scores = scores.reshape(c.kv_heads, rep, n, total)
            if n > 1:
                pos = torch.arange(total, device=self.device)
                causal = pos[None, :] > (s + torch.arange(n, device=self.device))[:, None]
                scores = scores.masked_fill(causal, -math.inf)
            probs = torch.softmax(scores, dim=-1)
            ctx = probs.reshape(c.kv_heads, rep * n, total) @ values
            out[row : row + n] = (
                ctx.reshape(c.kv_heads, rep, n, c.head_dim).permute(2, 0, 1, 3).reshape(n, -1)
            )
            row += n
        return out

    def _layer(
        self,
        li: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        entries: Sequence[Entry],
        caches: list[_Cache],
    ) -> torch.Tensor:
        c, w = self.config, self._layers[li]
        rows = h.shape[0]
        x = _rms_norm(h, w.in_norm, c.rms_eps)
        qkv = x @ w.qkv.T
        if w.qkv_bias is not None:
            qkv = qkv + w.qkv_bias
        qd, kd = c.heads * c.head_dim, c.kv_heads * c.head_dim
        q = qkv[:, :qd].reshape(rows, c.heads, c.head_dim)
        k = qkv[:, qd : qd + kd].reshape(rows, c.kv_heads, c.head_dim)
        v = qkv[:, qd + kd :].reshape(rows, c.kv_heads, c.head_dim)
        q = _rotate(q, cos[:, None, :], sin[:, None, :])
        k = _rotate(k, cos[:, None, :], sin[:, None, :])
        h = h + self._attend(li, q, k, v, entries, caches) @ w.o.T
        x = _rms_norm(h, w.post_norm, c.rms_eps)
        gu = x @ w.gate_up.T
        gate, up = gu[:, : c.intermediate], gu[:, c.intermediate :]
        return h + (torch.nn.functional.silu(gate) * up) @ w.down.T

    def forward(
        self, entries: Sequence[Entry], x: npt.NDArray[Any], *, all_rows: bool = False
    ) -> F32:
        rows = sum(e.count for e in entries)
        if not entries or any(e.count < 1 for e in entries):
            raise ExecutorError("a request needs at least one entry, each with at least one token")
        with torch.inference_mode():
            h = self._input(x, rows)
            caches = [self._cache_for(e) for e in entries]
            if len({e.seq_id for e in entries}) != len(entries):
                raise ExecutorError("a sequence appears twice in one request")
            positions = np.concatenate([np.arange(e.start, e.start + e.count) for e in entries])
            cos, sin = self._rope(positions)
            try:
                for li in range(len(self._layers)):
                    h = self._layer(li, h, cos, sin, entries, caches)
            except BaseException:
                for e in entries:  # a half-written step would poison the sequence: drop it
                    self.release(e.seq_id)
                raise
            for e, cache in zip(entries, caches, strict=True):
                cache.length = e.start + e.count
            if self.head:
                if not all_rows:
                    ends = np.cumsum([e.count for e in entries]) - 1
                    h = h[torch.from_numpy(ends).to(self.device)]
                assert self._final_norm is not None and self._head is not None
                h = _rms_norm(h, self._final_norm, self.config.rms_eps) @ self._head.T
            return h.cpu().numpy()

    def _input(self, x: npt.NDArray[Any], rows: int) -> torch.Tensor:
        c = self.config
        if self.embeddings:
            ids = np.asarray(x)
            if ids.shape != (rows,) or ids.dtype.kind not in "iu":
                raise ExecutorError(
                    f"the first stage takes {rows} token ids, got {ids.dtype} {ids.shape}"
                )
            if rows and (ids.min() < 0 or ids.max() >= c.vocab):
                raise ExecutorError(
                    f"token id out of range [0, {c.vocab}): {int(ids.min())}..{int(ids.max())}"
                )
            assert self._embed is not None
            return self._embed[torch.from_numpy(ids.astype(np.int64)).to(self.device)]
        h = np.asarray(x)
        if h.shape != (rows, c.hidden) or h.dtype != np.float32:
            raise ExecutorError(
                f"stage at layer {self.layer_start} takes float32 hidden states of shape "
                f"({rows}, {c.hidden}), got {h.dtype} {h.shape}"
            )
        # Frames arrive as read-only buffers; torch wants a writable array to share.
        return torch.from_numpy(np.array(h, dtype=np.float32)).to(self.device)
