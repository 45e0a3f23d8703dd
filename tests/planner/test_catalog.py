"""The catalog's architecture arithmetic against published parameter counts."""

from __future__ import annotations

import pytest

from shardplane.bus.messages import ModelCard
from shardplane.planner.catalog import (
    CATALOG,
    Q4_BYTES,
    Q8_BYTES,
    UnknownModel,
    card,
    catalog_table,
    resolve,
)
from shardplane.planner.profile import card_params, profile_from_card

# Published totals (billions), from the model cards / configs' safetensors totals.
PUBLISHED = {
    "llama-3.2-1b": 1.24,
    "llama-3.2-3b": 3.21,
    "llama-3.1-8b": 8.03,
    "llama-3.1-70b": 70.6,
    "llama-3.1-405b": 405.9,
    "qwen2.5-7b": 7.62,
    "qwen2.5-72b": 72.7,
    "mistral-7b": 7.25,
    "mixtral-8x7b": 46.7,
    "qwen3-32b": 32.8,
    "qwen3-235b-a22b": 235.1,
}


@pytest.mark.parametrize(("name", "billions"), sorted(PUBLISHED.items()))
def test_parameter_counts_match_published(name: str, billions: float) -> None:
    got = card_params(card(name)) / 1e9
    assert got == pytest.approx(billions, rel=0.005), (
        f"{name}: {got:.3f} B vs published {billions} B"
    )


def test_llama_8b_bytes_from_architecture() -> None:
    p = profile_from_card(card("llama-3.1-8b"))
    # One layer: q,o 4096x4096, k,v 4096x1024, MLP 3 x 4096x14336, two norms; bf16.
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert p.layer_bytes == (per_layer * 2,) * 32
    assert p.embed_bytes == 128256 * 4096 * 2
    assert p.head_bytes == (128256 * 4096 + 4096) * 2  # lm_head + final norm
    assert p.kv_bytes_per_token == (2 * 8 * 128 * 2,) * 32  # K and V, 8 KV heads x 128, fp16
    assert p.activation_bytes_per_token == 4096 * 2


def test_tied_embeddings_still_need_a_head_on_the_last_stage() -> None:
    c = card("llama-3.2-1b")
    p = profile_from_card(c)
    assert c.tied_embeddings
    assert p.head_bytes >= p.embed_bytes  # the last stage holds the matrix too
    # One stage holding the whole model holds the shared matrix once: exactly the parameters.
    assert p.weight_bytes == card_params(c) * 2
    # Split, the first stage holds it as embeddings and the last as head: twice.
    split = p.end_bytes(True, False) + p.end_bytes(False, True)
    assert split - p.end_bytes(True, True) == p.embed_bytes == p.tied_bytes


def test_quantised_variants_scale_weights_not_kv() -> None:
    base, q8, q4 = (profile_from_card(card(f"llama-3.1-70b{s}")) for s in ("", "-q8", "-q4"))
    assert q8.layer_bytes[0] == pytest.approx(base.layer_bytes[0] * Q8_BYTES / 2, rel=1e-6)
    assert q4.layer_bytes[0] == pytest.approx(base.layer_bytes[0] * Q4_BYTES / 2, rel=1e-6)
    assert q4.kv_bytes_per_token == base.kv_bytes_per_token
    assert len(CATALOG) >= 3 * 11


def test_moe_reads_only_routed_experts() -> None:
    p = profile_from_card(card("mixtral-8x7b"))
    one = p.read_bytes(1)[0]
    assert one < p.layer_bytes[0] * 0.4  # 2 of 8 experts + attention
    assert p.read_bytes(64)[0] == pytest.approx(p.layer_bytes[0], rel=1e-3)  # big batches touch all


def test_lookup_and_errors() -> None:
    assert resolve("LLAMA-3.1-8B").layers == 32
    assert (
        resolve(
            ModelCard(
                name="tiny", layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=100
            )
        ).layers
        == 4
    )
    with pytest.raises(UnknownModel, match="not in the catalog"):
        card("llama-9-999b")


def test_catalog_table_lists_every_model() -> None:
    table = catalog_table()
    for name in CATALOG:
        assert name in table
    assert "70.55" in table  # llama-3.1-70b params (B)
