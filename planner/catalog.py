"""Built-in model cards (exact architectures from the models' published configs) and model lookup.

Each base card comes in three precisions: bf16 (``<name>``), 8-bit (``<name>-q8``) and 4-bit
(``<name>-q4``). Quantised sizes include the block scales real formats carry: 8.5 bits per
weight for 8-bit (llama.cpp Q8_0: 32 int8 + one fp16 scale) and 4.5 bits for 4-bit (GPTQ/AWQ with
group size 128 and fp16 scale + zero, or Q4_K) — so 1.0625 and 0.5625 bytes per parameter. The
KV cache stays fp16 in every variant.
"""

from __future__ import annotations

from typing import TypedDict

from shardplane.bus.errors import PlannerError
from shardplane.bus.messages import ModelCard
from shardplane.planner.profile import ModelProfile, card_params, profile_from_card

Q8_BYTES = 1.0625
Q4_BYTES = 0.5625


class _Extra(TypedDict, total=False):
    """Card fields that only some architectures set (the rest keep ModelCard's defaults)."""

    tied_embeddings: bool
    attention_bias: bool
    experts: int
    experts_per_token: int
    moe_intermediate: int


TIED: _Extra = {"tied_embeddings": True}  # input embedding reused as the output head
QKV_BIAS: _Extra = {"attention_bias": True}


def _moe(experts: int, per_token: int, intermediate: int) -> _Extra:
    return {"experts": experts, "experts_per_token": per_token, "moe_intermediate": intermediate}


_Row = tuple[str, int, int, int, int, int, int, int, float, _Extra]

# fmt: off
# One row per architecture, from the published config.json; params (B) is the published total,
# which tests/planner/test_catalog.py checks the arithmetic against.
_ROWS: tuple[_Row, ...] = (
    # name              layers hidden interm. heads kv head_dim vocab   params  extra
    ("llama-3.2-1b",     16,   2048,  8192,   32,   8,  64,     128256, 1.24,   TIED),
    ("llama-3.2-3b",     28,   3072,  8192,   24,   8,  128,    128256, 3.21,   TIED),
    ("llama-3.1-8b",     32,   4096,  14336,  32,   8,  128,    128256, 8.03,   {}),
    ("llama-3.1-70b",    80,   8192,  28672,  64,   8,  128,    128256, 70.6,   {}),
    ("llama-3.3-70b",    80,   8192,  28672,  64,   8,  128,    128256, 70.6,   {}),
    ("llama-3.1-405b",   126,  16384, 53248,  128,  8,  128,    128256, 405.9,  {}),
    ("qwen2.5-7b",       28,   3584,  18944,  28,   4,  128,    152064, 7.62,   QKV_BIAS),
    ("qwen2.5-72b",      80,   8192,  29568,  64,   8,  128,    152064, 72.7,   QKV_BIAS),
    ("mistral-7b",       32,   4096,  14336,  32,   8,  128,    32768,  7.25,   {}),
    ("mixtral-8x7b",     32,   4096,  14336,  32,   8,  128,    32000,  46.7,   _moe(8, 2, 14336)),
    ("qwen3-32b",        64,   5120,  25600,  64,   8,  128,    151936, 32.8,   {}),
    ("qwen3-235b-a22b",  94,   4096,  12288,  64,   4,  128,    151936, 235.1,  _moe(128, 8, 1536)),
)
# fmt: on


def _base_card(row: _Row) -> ModelCard:
    name, layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, params_b, extra = row
    return ModelCard(
        name=name,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        params_b=params_b,
        **extra,
    )


_BASE: tuple[ModelCard, ...] = tuple(_base_card(r) for r in _ROWS)


def _variant(card: ModelCard, suffix: str, bytes_per_param: float) -> ModelCard:
    fields = {f: getattr(card, f) for f in card.__struct_fields__}
    fields.update(name=f"{card.name}-{suffix}", bytes_per_param=bytes_per_param)
    return ModelCard(**fields)


def _build() -> dict[str, ModelCard]:
    cards: dict[str, ModelCard] = {}
    for card in _BASE:
        cards[card.name] = card
        cards[f"{card.name}-q8"] = _variant(card, "q8", Q8_BYTES)
        cards[f"{card.name}-q4"] = _variant(card, "q4", Q4_BYTES)
    return cards


# Models that really run here (``agents.gguf.PACKAGED``: weights shipped in a Python package).
# Sized as the executor holds them: dequantised to fp32 weights and an fp32 KV cache, so the
# plan's bytes and step times describe what runs, not the Q4_1 file on disk.
RUNNABLE: tuple[ModelCard, ...] = (
    ModelCard(
        name="smollm2-135m",
        layers=30,
        hidden=576,
        intermediate=1536,
        heads=9,
        kv_heads=3,
        head_dim=64,
        vocab=49152,
        tied_embeddings=True,
        bytes_per_param=4.0,
        kv_bytes_per_elem=4.0,
        params_b=0.135,
    ),
)

CATALOG: dict[str, ModelCard] = _build() | {c.name: c for c in RUNNABLE}


class UnknownModel(PlannerError, LookupError):
    """The model named in a request is not in the catalog (``str()`` lists close names)."""


def card(name: str) -> ModelCard:
    """A catalog card by name (case-insensitive; ``_`` and ``-`` are interchangeable)."""
    key = name.strip().lower().replace("_", "-")
    if found := CATALOG.get(key):
        return found
    close = [n for n in CATALOG if key.split("-")[0] in n][:6]
    hint = (
        f"; close: {', '.join(close)}" if close else f"; known: {', '.join(n.name for n in _BASE)}"
    )
    raise UnknownModel(f"model {name!r} is not in the catalog ({len(CATALOG)} models){hint}")


def resolve(model: str | ModelCard) -> ModelProfile:
    """The byte profile for a request's ``model``: catalog name, ``hf:<dir>`` or inline card.

    Raises UnknownModel for an unknown name, and ``planner.hf.CheckpointError`` for an unreadable
    checkpoint.
    """
    if isinstance(model, ModelCard):
        return profile_from_card(model)
    if model.startswith("hf:"):
        from shardplane.planner.hf import (
            load_profile,  # only requests that name a checkpoint pay for it
        )

        return load_profile(model[3:])
    return profile_from_card(card(model))


def catalog_table() -> str:
    """The catalog as a terminal table (``shardplane models``)."""
    headers = (
        "model",
        "layers",
        "hidden",
        "heads/kv",
        "vocab",
        "bytes/param",
        "params (B)",
        "weights GiB",
        "layer MiB",
        "KV KiB/token",
    )
    rows: list[tuple[str, ...]] = []
    for c in CATALOG.values():
        p = profile_from_card(c)
        experts = f" x{c.experts}e/{c.experts_per_token}" if c.experts > 1 else ""
        rows.append(
            (
                c.name + experts,
                str(c.layers),
                str(c.hidden),
                f"{c.heads}/{c.kv_heads}",
                str(c.vocab),
                f"{c.bytes_per_param:g}",
                f"{card_params(c) / 1e9:.2f}",
                f"{p.weight_bytes / 1024**3:.1f}",
                f"{p.layer_bytes[0] / 1024**2:.0f}",
                f"{sum(p.kv_bytes_per_token) / 1024:.0f}",
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
