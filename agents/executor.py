"""Run decoder layers ``[layer_start, layer_end)`` of a Llama-family model: the stage executor.

Why its own module: a placement is only believable once the stages it cut really compose into
the model. This is the arithmetic a worker runs for its stage, in plain numpy fp32, so that it
runs everywhere (CI, the simulated demo fleet, a laptop) and can be checked against engines
nobody here wrote (llama.cpp, transformers). A faster backend (torch on a GPU) implements the
same ``StageBackend`` protocol; callers never see which one runs. What a stage does whatever
its arrays are (cache bookkeeping, a request's checks, a step's order, a layer's wiring) is
``StageCore``, written once; each backend gives it array operations in its own library.

What is covered: RMSNorm, rotary embeddings in the Hugging Face "rotate half" layout (with
``rope_scaling``/``rope_parameters`` of type ``llama3`` or ``linear``), grouped-query attention
with optional q/k/v bias (Qwen2), SwiGLU MLP, tied or untied output head. Checkpoints in other
layouts (llama.cpp's GGUF) are converted to this one when they are read (``agents.gguf``).

Determinism: a layer's arithmetic does not depend on where the stage boundaries are, and
hidden states cross stages as exact fp32 bytes, so any split yields bitwise-identical logits.
That is what lets tests demand identical tokens for 1, 2, 3 and 7 stages.

The KV cache is per sequence (``seq_id``): a batch is a list of entries, each a run of new
tokens of one sequence at known positions (a prefill chunk, or one decode token). Projections
run on all rows of all entries at once (that is where batching pays); attention runs per
sequence against its own cache.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, Self, TypeVar

import numpy as np
import numpy.typing as npt

from shardplane.bus.errors import AgentError

F32 = npt.NDArray[Any]  # float32 throughout (numpy's stubs widen it at every operator)
MIN_CACHE = 64  # initial KV capacity in positions; doubled when a sequence outgrows it


class ExecutorError(AgentError):
    """A request the stage cannot run (bad positions, unknown sequence, wrong shapes);
    ``str()`` says which numbers were wrong."""


def cache_need(entry: Entry, have: int, layers: tuple[int, int], max_positions: int) -> int:
    """The positions ``entry``'s sequence holds once it is computed (its cache grows to at least
    this). An ExecutorError when the entry does not continue the ``have`` cached positions of
    ``layers`` or passes the model's ``max_positions``; every executor checks the same."""
    if entry.start != have:
        raise ExecutorError(
            f"sequence {entry.seq_id!r} has {have} cached positions at layers "
            f"[{layers[0]}, {layers[1]}) but the request starts at position "
            f"{entry.start}"
        )
    need = entry.start + entry.count
    if need > max_positions:
        raise ExecutorError(
            f"sequence {entry.seq_id!r} would reach {need} positions; the model allows "
            f"{max_positions}"
        )
    return need


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the arithmetic needs (from config.json or GGUF metadata)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    tied: bool = False
    attention_bias: bool = False
    max_positions: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    """A ``ModelConfig`` from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2, SmolLM).

    transformers 5 moved ``rope_theta``/``rope_scaling`` into ``rope_parameters``; both
    spellings are read."""
    text = raw.get("text_config")
    if isinstance(text, Mapping):
        raw = {**raw, **text}
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    params: Mapping[str, Any] = raw.get("rope_parameters") or {}
    scaling: Mapping[str, Any] | None = raw.get("rope_scaling") or (
        params if params.get("rope_type", "default") != "default" else None
    )
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    eos: Any = raw.get("eos_token_id")
    eos_list: list[Any] = eos if isinstance(eos, list) else ([] if eos is None else [eos])  # pyright: ignore[reportUnknownVariableType]
    eos_ids = tuple(int(e) for e in eos_list)
    return ModelConfig(
        layers=int(raw["num_hidden_layers"]),
        hidden=hidden,
        intermediate=int(raw["intermediate_size"]),
        heads=heads,
        kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        vocab=int(raw["vocab_size"]),
        rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tied=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", raw.get("model_type") == "qwen2")),
        max_positions=int(raw.get("max_position_embeddings", 8192)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def inv_frequencies(config: ModelConfig) -> npt.NDArray[np.float64]:
    """Rotary inverse frequencies, with llama3/linear scaling applied (as transformers does)."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old / low, old / high
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)
    if kind not in ("default", None):
        raise ExecutorError(
            f"rope scaling type {kind!r} is not supported (default, linear, llama3)"
        )
    return inv


@dataclass(frozen=True)
class Entry:
    """``count`` new tokens of sequence ``seq_id`` at positions ``start .. start+count-1``."""

    seq_id: str
    start: int
    count: int


T = TypeVar("T")


@dataclass
class LayerWeights(Generic[T]):
    """One decoder layer's weights in a backend's array type (numpy or torch): the layout both
    executors share, read once by ``read_layer`` so the Hugging Face names live in one place."""

    in_norm: T
    qkv: T  # [q; k; v] rows stacked: one matmul instead of three
    qkv_bias: T | None
    o: T
    post_norm: T
    gate_up: T  # [gate; up] rows stacked
    down: T


def read_layer(
    get: Callable[[str], T], cat: Callable[[list[T]], T], index: int, bias: bool
) -> LayerWeights[T]:
    """Layer ``index`` from Hugging Face tensor names; ``cat`` stacks rows in the backend."""
    p = f"model.layers.{index}."
    return LayerWeights(
        in_norm=get(p + "input_layernorm.weight"),
        qkv=cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
        qkv_bias=cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]) if bias else None,
        o=get(p + "self_attn.o_proj.weight"),
        post_norm=get(p + "post_attention_layernorm.weight"),
        gate_up=cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
        down=get(p + "mlp.down_proj.weight"),
    )


def read_head(get: Callable[[str], T], names: Container[str], embed: T | None) -> tuple[T, T]:
    """The last stage's final norm and output head. A tied head (no ``lm_head.weight``) reuses
    the embedding matrix when this stage holds it, so it is kept once."""
    if "lm_head.weight" in names:
        return get("model.norm.weight"), get("lm_head.weight")
    tied = embed if embed is not None else get("model.embed_tokens.weight")
    return get("model.norm.weight"), tied


class StageBackend(Protocol):
    """What a worker drives; numpy here, torch where installed (same arguments, same results
    within that backend's precision)."""

    layer_start: int
    layer_end: int
    embeddings: bool
    head: bool
    config: ModelConfig

    def forward(
        self, entries: Sequence[Entry], x: npt.NDArray[Any], *, all_rows: bool = False
    ) -> F32:
        """Run the stage. ``x`` is token ids [rows] on the first stage, hidden states
        [rows, hidden] otherwise. Returns hidden states [rows, hidden], or on the last stage
        logits for the last row of each entry [entries, vocab] (every row with ``all_rows``)."""
        ...

    @property
    def name(self) -> str:
        """What runs the stage (``numpy-cpu``, ``torch-cuda:0``): reported with its timings."""
        ...

    def release(self, seq_id: str) -> bool: ...

    def sequences(self) -> list[str]: ...

    def read_bytes(self) -> int:
        """Weight bytes one decode step reads (layers, plus norm and head on the last stage):
        what a measured step time is divided into for calibration."""
        ...


def as_f32(array: npt.NDArray[Any], dtype: str | None = None) -> F32:
    """A loaded tensor as fp32. bf16 is held as raw uint16 by the loader (numpy has no bf16):
    its bits are the top half of an fp32."""
    if dtype == "BF16" or (dtype is None and array.dtype == np.uint16):
        return (array.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(array, dtype=np.float32)


def _rms_norm(x: F32, weight: F32, eps: float) -> F32:
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))) * weight


class Tensor(Protocol):
    """What the shared stage code (``StageCore``) does with a backend's arrays: index, reshape,
    transpose a matrix, multiply and add. numpy's ndarray and torch's Tensor both are one; all
    else (norms, softmax, where arrays live) each backend does in its own library."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def T(self) -> Self: ...

    @property
    def nbytes(self) -> int: ...

    def reshape(self, *shape: int) -> Self: ...

    def __getitem__(self, key: Any, /) -> Self: ...

    def __setitem__(self, key: Any, value: Self, /) -> None: ...

    def __matmul__(self, other: Self, /) -> Self: ...

    def __add__(self, other: Self, /) -> Self: ...


A = TypeVar("A", bound=Tensor)


@dataclass
class _Cache(Generic[A]):
    k: A  # [layers, kv_heads, capacity, head_dim]
    v: A
    length: int = 0


def check_layers(config: ModelConfig, layer_start: int, layer_end: int) -> None:
    """An ExecutorError unless ``[layer_start, layer_end)`` lies within the model's layers."""
    if not 0 <= layer_start <= layer_end <= config.layers:
        raise ExecutorError(
            f"layer range [{layer_start}, {layer_end}) is outside the model's "
            f"{config.layers} layers"
        )


@dataclass
class StageCore(ABC, Generic[A]):
    """What every stage executor does the same whatever holds its arrays: the KV cache's
    bookkeeping, the request's checks, the order of a step (rotary angles, layers, head) and a
    decoder layer's wiring. A backend (``NumpyStage``, ``agents.executor_torch.TorchStage``)
    supplies the array operations in its own library, the abstract methods below, so each
    keeps its own rounding and device while the logic lives once."""

    config: ModelConfig
    layer_start: int
    layer_end: int
    embeddings: bool
    head: bool
    _layers: list[LayerWeights[A]] = field(default_factory=lambda: [], init=False)
    _embed: A | None = field(default=None, init=False)
    _final_norm: A | None = field(default=None, init=False)
    _head: A | None = field(default=None, init=False)
    _inv: npt.NDArray[np.float64] | None = field(default=None, init=False)
    _caches: dict[str, _Cache[A]] = field(default_factory=lambda: {}, init=False)

    # --- the backend's array operations ------------------------------------------------------

    @abstractmethod
    def _zeros(self, shape: tuple[int, ...]) -> A: ...

    @abstractmethod
    def _empty(self, rows: int, cols: int) -> A: ...

    @abstractmethod
    def _put(self, array: F32) -> A:
        """A fresh host array (rotary tables) where the stage computes."""

    @abstractmethod
    def _adopt(self, hidden: F32) -> A:
        """Hidden states from a request (possibly a read-only frame buffer)."""

    @abstractmethod
    def _take(self, array: A, rows: npt.NDArray[Any]) -> A:
        """``array``'s rows at the host indices ``rows``."""

    @abstractmethod
    def _swap01(self, x: A) -> A:
        """[rows, heads, d] as [heads, rows, d]."""

    @abstractmethod
    def _rms_norm(self, x: A, weight: A) -> A: ...

    @abstractmethod
    def _rotate(self, x: A, cos: A, sin: A) -> A: ...

    @abstractmethod
    def _swiglu(self, gate: A, up: A) -> A: ...

    @abstractmethod
    def _attention(self, q: A, keys: A, values: A, start: int) -> A:
        """One sequence's new rows ``q`` [n, heads, d] (positions ``start..``) against its
        cached ``keys``/``values`` [kv_heads, start+n, d]: the context [n, heads*d]."""

    # --- weights ------------------------------------------------------------------------------

    def _load(
        self, names: Container[str], read: Callable[[str], A], cat: Callable[[list[A]], A]
    ) -> None:
        """The stage's weights by Hugging Face name: ``read`` brings one of ``names`` into the
        backend, ``cat`` stacks rows there."""

        def get(name: str) -> A:
            if name not in names:
                raise ExecutorError(f"tensor {name} missing from the stage's weights")
            return read(name)

        for i in range(self.layer_start, self.layer_end):
            self._layers.append(read_layer(get, cat, i, self.config.attention_bias))
        if self.embeddings:
            self._embed = get("model.embed_tokens.weight")
        if self.head:
            self._final_norm, self._head = read_head(get, names, self._embed)
        self._inv = inv_frequencies(self.config)

    def read_bytes(self) -> int:
        total = sum(
            sum(t.nbytes for t in (w.in_norm, w.qkv, w.o, w.post_norm, w.gate_up, w.down))
            + (0 if w.qkv_bias is None else w.qkv_bias.nbytes)
            for w in self._layers
        )
        if self.head and self._head is not None and self._final_norm is not None:
            total += self._head.nbytes + self._final_norm.nbytes
        return total

    # --- cache ------------------------------------------------------------------------------

    def sequences(self) -> list[str]:
        return sorted(self._caches)

    def cached_positions(self, seq_id: str) -> int:
        cache = self._caches.get(seq_id)
        return 0 if cache is None else cache.length

    def release(self, seq_id: str) -> bool:
        return self._caches.pop(seq_id, None) is not None

    def _cache_for(self, entry: Entry) -> _Cache[A]:
        c = self.config
        cache = self._caches.get(entry.seq_id)
        have = 0 if cache is None else cache.length
        need = cache_need(entry, have, (self.layer_start, self.layer_end), c.max_positions)
        if cache is None or need > cache.k.shape[2]:
            cap = max(MIN_CACHE, 1 << (need - 1).bit_length())
            shape = (len(self._layers), c.kv_heads, cap, c.head_dim)
            k, v = self._zeros(shape), self._zeros(shape)
            if cache is not None:
                k[:, :, : cache.length] = cache.k[:, :, : cache.length]
                v[:, :, : cache.length] = cache.v[:, :, : cache.length]
            cache = _Cache(k=k, v=v, length=have)
            self._caches[entry.seq_id] = cache
        return cache

    # --- a step -------------------------------------------------------------------------------

    def _rope(self, positions: npt.NDArray[np.int64]) -> tuple[A, A]:
        # Angles in float64 on the host whatever the backend: cos/sin round the same in each.
        assert self._inv is not None
        freqs = np.outer(positions.astype(np.float64), self._inv)
        emb = np.concatenate([freqs, freqs], axis=-1)
        return self._put(np.cos(emb).astype(np.float32)), self._put(np.sin(emb).astype(np.float32))

    def _attend(
        self, li: int, q: A, k: A, v: A, entries: Sequence[Entry], caches: list[_Cache[A]]
    ) -> A:
        c = self.config
        out = self._empty(q.shape[0], c.heads * c.head_dim)
        row = 0
        for entry, cache in zip(entries, caches, strict=True):
            n, s = entry.count, entry.start
            cache.k[li, :, s : s + n] = self._swap01(k[row : row + n])
            cache.v[li, :, s : s + n] = self._swap01(v[row : row + n])
            keys, values = cache.k[li, :, : s + n], cache.v[li, :, : s + n]
            out[row : row + n] = self._attention(q[row : row + n], keys, values, s)
            row += n
        return out

    def _layer(
        self, li: int, h: A, cos: A, sin: A, entries: Sequence[Entry], caches: list[_Cache[A]]
    ) -> A:
        c, w = self.config, self._layers[li]
        rows = h.shape[0]
        x = self._rms_norm(h, w.in_norm)
        qkv = x @ w.qkv.T
        if w.qkv_bias is not None:
            qkv = qkv + w.qkv_bias
        qd, kd = c.heads * c.head_dim, c.kv_heads * c.head_dim
        q = qkv[:, :qd].reshape(rows, c.heads, c.head_dim)
        k = qkv[:, qd : qd + kd].reshape(rows, c.kv_heads, c.head_dim)
        v = qkv[:, qd + kd :].reshape(rows, c.kv_heads, c.head_dim)
        q = self._rotate(q, cos[:, None, :], sin[:, None, :])
        k = self._rotate(k, cos[:, None, :], sin[:, None, :])
        h = h + self._attend(li, q, k, v, entries, caches) @ w.o.T
        x = self._rms_norm(h, w.post_norm)
        gu = x @ w.gate_up.T
        return h + self._swiglu(gu[:, : c.intermediate], gu[:, c.intermediate :]) @ w.down.T

    def _step(self, entries: Sequence[Entry], x: npt.NDArray[Any], all_rows: bool) -> A:
        """``StageBackend.forward`` in the backend's arrays."""
        rows = sum(e.count for e in entries)
        if not entries or any(e.count < 1 for e in entries):
            raise ExecutorError("a request needs at least one entry, each with at least one token")
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
        if not self.head:
            return h
        if not all_rows:
            h = self._take(h, np.cumsum([e.count for e in entries]) - 1)
        assert self._final_norm is not None and self._head is not None
        return self._rms_norm(h, self._final_norm) @ self._head.T

    def _input(self, x: npt.NDArray[Any], rows: int) -> A:
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
            return self._take(self._embed, ids)
        h = np.asarray(x)
        if h.shape != (rows, c.hidden) or h.dtype != np.float32:
            raise ExecutorError(
                f"stage at layer {self.layer_start} takes float32 hidden states of shape "
                f"({rows}, {c.hidden}), got {h.dtype} {h.shape}"
            )
        return self._adopt(h)


@dataclass
class NumpyStage(StageCore[F32]):
    """One stage of a Llama-family model in numpy fp32. ``tensors`` use Hugging Face names."""

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        tensors: Mapping[str, npt.NDArray[Any]],
        *,
        layer_start: int,
        layer_end: int,
        embeddings: bool,
        head: bool,
        dtypes: Mapping[str, str] | None = None,
    ) -> NumpyStage:
        check_layers(config, layer_start, layer_end)
        types = dtypes or {}

        def read(name: str) -> F32:
            return as_f32(tensors[name], types.get(name))

        stage = cls(config, layer_start, layer_end, embeddings, head)
        stage._load(tensors, read, np.concatenate)
        return stage

    @property
    def name(self) -> str:
        return "numpy-cpu"

    def forward(
        self, entries: Sequence[Entry], x: npt.NDArray[Any], *, all_rows: bool = False
    ) -> F32:
        return self._step(entries, x, all_rows)

    def _zeros(self, shape: tuple[int, ...]) -> F32:
        return np.zeros(shape, np.float32)

    def _empty(self, rows: int, cols: int) -> F32:
        return np.empty((rows, cols), np.float32)

    def _put(self, array: F32) -> F32:
        return array

    def _adopt(self, hidden: F32) -> F32:
        return hidden

    def _take(self, array: F32, rows: npt.NDArray[Any]) -> F32:
        return array[rows]

    def _swap01(self, x: F32) -> F32:
        return x.transpose(1, 0, 2)

    def _rms_norm(self, x: F32, weight: F32) -> F32:
        return _rms_norm(x, weight, self.config.rms_eps)

    def _rotate(self, x: F32, cos: F32, sin: F32) -> F32:
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def _swiglu(self, gate: F32, up: F32) -> F32:
        return gate / (np.float32(1.0) + np.exp(-gate)) * up

    def _attention(self, q: F32, keys: F32, values: F32, start: int) -> F32:
        c = self.config
        n: int = q.shape[0]
        total, rep = start + n, c.heads // c.kv_heads
        scale = np.float32(1.0 / math.sqrt(c.head_dim))
        qg = q.reshape(n, c.kv_heads, rep, c.head_dim).transpose(1, 2, 0, 3)
        scores = (qg.reshape(c.kv_heads, rep * n, c.head_dim) @ keys.transpose(0, 2, 1)) * scale
        scores = scores.reshape(c.kv_heads, rep, n, total)
        if n > 1:
            causal = np.arange(total)[None, :] > (start + np.arange(n))[:, None]
            scores = np.where(causal, np.float32(-np.inf), scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        ctx = probs.reshape(c.kv_heads, rep * n, total) @ values
        return ctx.reshape(c.kv_heads, rep, n, c.head_dim).transpose(2, 0, 1, 3).reshape(n, -1)


# --- sampling ---------------------------------------------------------------------------------


def sample(logits: F32, *, temperature: float, top_p: float, seed: int, position: int) -> int:
    """The next token from one row of logits: greedy at temperature 0, else nucleus sampling
    with a generator seeded by (seed, position), so the draw does not depend on which process
    samples or how the model was split."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    keep = int(np.searchsorted(np.cumsum(sorted_p), top_p) + 1) if top_p < 1.0 else len(order)
    kept = sorted_p[:keep] / sorted_p[:keep].sum()
    rng = np.random.default_rng([seed & 0xFFFFFFFF, position])
    return int(order[rng.choice(keep, p=kept)])
