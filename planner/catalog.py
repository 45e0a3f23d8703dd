"""Built-in model cards (exact architectures from the models' published configs) and model lookup.

Each base card comes in three precisions: bf16 (``<name>``), 8-bit (``<name>-q8``) and 4-bit
(``<name>-q4``). Quantised sizes include the block scales real formats carry: 8.5 bits per
weight for 8-bit (llama.cpp Q8_0: 32 int8 + one fp16 scale) and 4.5 bits for 4-bit (GPTQ/AWQ with
group size 128 and fp16 scale + zero, or Q4_K) — so 1.0625 and 0.5625 bytes per parameter. The
KV cache stays fp16 in every variant.
"""

from __future__ import annotations

from bus.messages import ModelCard
from planner.profile import ModelProfile, card_params, profile_from_card

Q8_BYTES = 1.0625
Q4_BYTES = 0.5625

_BASE: tuple[ModelCard, ...] = (
    ModelCard(
        name="llama-3.2-1b",
        layers=16,
        hidden=2048,
        intermediate=8192,
        heads=32,
        kv_heads=8,
        head_dim=64,
        vocab=128256,
        tied_embeddings=True,
        params_b=1.24,
    ),
    ModelCard(
        name="llama-3.2-3b",
        layers=28,
        hidden=3072,
        intermediate=8192,
        heads=24,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        tied_embeddings=True,
        params_b=3.21,
    ),
    ModelCard(
        name="llama-3.1-8b",
        layers=32,
        hidden=4096,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        params_b=8.03,
    ),
    ModelCard(
        name="llama-3.1-70b",
        layers=80,
        hidden=8192,
        intermediate=28672,
        heads=64,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        params_b=70.6,
    ),
    ModelCard(
        name="llama-3.3-70b",
        layers=80,
        hidden=8192,
        intermediate=28672,
        heads=64,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        params_b=70.6,
    ),
    ModelCard(
        name="llama-3.1-405b",
        layers=126,
        hidden=16384,
        intermediate=53248,
        heads=128,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        params_b=405.9,
    ),
    ModelCard(
        name="qwen2.5-7b",
        layers=28,
        hidden=3584,
        intermediate=18944,
        heads=28,
        kv_heads=4,
        head_dim=128,
        vocab=152064,
        attention_bias=True,
        params_b=7.62,
    ),
    ModelCard(
        name="qwen2.5-72b",
        layers=80,
        hidden=8192,
        intermediate=29568,
        heads=64,
        kv_heads=8,
        head_dim=128,
        vocab=152064,
        attention_bias=True,
        params_b=72.7,
    ),
    ModelCard(
        name="mistral-7b",
        layers=32,
        hidden=4096,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=32768,
        params_b=7.25,
    ),
    ModelCard(
        name="mixtral-8x7b",
        layers=32,
        hidden=4096,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=32000,
        experts=8,
        experts_per_token=2,
        moe_intermediate=14336,
        params_b=46.7,
    ),
    ModelCard(
        name="qwen3-32b",
        layers=64,
        hidden=5120,
        intermediate=25600,
        heads=64,
        kv_heads=8,
        head_dim=128,
        vocab=151936,
        params_b=32.8,
    ),
    ModelCard(
        name="qwen3-235b-a22b",
        layers=94,
        hidden=4096,
        intermediate=12288,
        heads=64,
        kv_heads=4,
        head_dim=128,
        vocab=151936,
        experts=128,
        experts_per_token=8,
        moe_intermediate=1536,
        params_b=235.1,
    ),
)


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


CATALOG: dict[str, ModelCard] = _build()


class UnknownModel(LookupError):
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
        from planner.hf import load_profile  # only requests that name a checkpoint pay for it

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
