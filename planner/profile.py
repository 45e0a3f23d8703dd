"""A model's byte profile: every byte the cost model needs, per layer.

A ``ModelProfile`` is what the planner actually plans with. It comes either from a ``ModelCard``
(architecture arithmetic, :func:`profile_from_card`) or from a checkpoint's safetensors headers
(exact sizes, :mod:`planner.hf`), so layers may differ in size and the planner uses the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardplane.bus.messages import ModelCard

ACTIVATION_BYTES_PER_ELEM = 2  # hidden states cross a stage boundary in fp16/bf16


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Bytes of one model, per layer. All figures are bytes (ints) unless stated.

    ``layer_bytes[i]``: weights of layer ``i`` held in memory.
    ``layer_expert_bytes[i]``: the part of ``layer_bytes[i]`` that is routed experts (MoE);
    a decode step reads only the experts its tokens were routed to, see :meth:`read_bytes`.
    ``kv_bytes_per_token[i]``: K and V cache bytes of layer ``i`` for one token of one sequence.
    ``embed_bytes``: input embedding table (first stage); ``head_bytes``: output head plus final
    norm (last stage). With tied embeddings the last stage still needs the matrix, so
    ``head_bytes`` is its size even when the checkpoint stores it once; ``tied_bytes`` is that
    shared part, held once by a stage that is both first and last (see :meth:`end_bytes`).
    """

    name: str
    layer_bytes: tuple[int, ...]
    kv_bytes_per_token: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    hidden: int
    layer_expert_bytes: tuple[int, ...] = ()
    experts: int = 1
    experts_per_token: int = 1
    params: int = 0  # parameters counted once (tied embeddings once)
    tied_bytes: int = 0  # the part of head_bytes that is the embedding matrix (tied embeddings)
    attention_dim: int = 0  # query heads x head dim (0: hidden), for the attention FLOPs

    @property
    def params_per_byte(self) -> float:
        """Parameters per weight byte (0.5 for bf16, 2 for 4-bit), for the compute term; a
        profile without a parameter count is taken as bf16."""
        total = self.weight_bytes
        return self.params / total if self.params and total else 0.5

    def layer_flops_per_token(self, context: int) -> tuple[float, ...]:
        """FLOPs of each layer for one token of one sequence at ``context``: 2 per parameter a
        token uses (MoE: its k of E experts) plus attention over the context (Q.K and A.V,
        2 x 2 x attention_dim per context token)."""
        ppb = self.params_per_byte
        share = (
            min(self.experts_per_token, self.experts) / self.experts if self.experts > 1 else 1.0
        )
        experts = self.layer_expert_bytes or (0,) * self.layers
        attn = 4.0 * (self.attention_dim or self.hidden) * context
        return tuple(
            2.0 * ppb * (total - ex + ex * share) + attn
            for total, ex in zip(self.layer_bytes, experts, strict=True)
        )

    @property
    def head_flops_per_token(self) -> float:
        """FLOPs of the output head for one token (2 per parameter of the matrix)."""
        return 2.0 * self.params_per_byte * self.head_bytes

    @property
    def layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def activation_bytes_per_token(self) -> int:
        return self.hidden * ACTIVATION_BYTES_PER_ELEM

    def end_bytes(self, first: bool, last: bool) -> int:
        """Weights a stage holds besides its layers: the embeddings on the first stage, the final
        norm and head on the last; a tied matrix once when one stage is both."""
        return (
            (self.embed_bytes if first else 0)
            + (self.head_bytes if last else 0)
            - (self.tied_bytes if first and last else 0)
        )

    @property
    def weight_bytes(self) -> int:
        """Every weight byte, as one stage holding the whole model holds them."""
        return sum(self.layer_bytes) + self.end_bytes(True, True)

    def expert_read_fraction(self, batch: int) -> float:
        """Expected share of a layer's experts one decode step of ``batch`` tokens touches:
        1 - (1 - k/E)^batch for top-k routing over E experts (uniform routing)."""
        if self.experts <= 1:
            return 1.0
        k = min(self.experts_per_token, self.experts) / self.experts
        return 1.0 - (1.0 - k) ** batch

    def read_bytes(self, batch: int) -> tuple[int, ...]:
        """Weight bytes each layer reads per decode step (dense: all of it; MoE: the routed
        experts only)."""
        if not self.layer_expert_bytes or self.experts <= 1:
            return self.layer_bytes
        frac = self.expert_read_fraction(batch)
        return tuple(
            total - experts + round(experts * frac)
            for total, experts in zip(self.layer_bytes, self.layer_expert_bytes, strict=True)
        )


def card_layer_params(card: ModelCard) -> tuple[int, int]:
    """(parameters of one transformer layer, of which routed-expert parameters)."""
    head_dim = card.head_dim or card.hidden // card.heads
    q = card.hidden * card.heads * head_dim
    kv = 2 * card.hidden * card.kv_heads * head_dim
    o = card.heads * head_dim * card.hidden
    bias = (card.heads + 2 * card.kv_heads) * head_dim if card.attention_bias else 0
    norms = 2 * card.hidden
    if card.experts > 1:
        inter = card.moe_intermediate or card.intermediate
        experts = card.experts * 3 * card.hidden * inter
        router = card.hidden * card.experts
        return q + kv + o + bias + norms + experts + router, experts
    return q + kv + o + bias + norms + 3 * card.hidden * card.intermediate, 0


def card_params(card: ModelCard) -> int:
    """Total parameters as published: layers + embeddings + final norm + untied head."""
    per_layer, _ = card_layer_params(card)
    embed = card.vocab * card.hidden
    head = 0 if card.tied_embeddings else card.vocab * card.hidden
    return card.layers * per_layer + embed + head + card.hidden


def profile_from_card(card: ModelCard) -> ModelProfile:
    """Bytes from architecture arithmetic; every layer of a card has the same size."""
    per_layer, expert_params = card_layer_params(card)
    head_dim = card.head_dim or card.hidden // card.heads
    bpp = card.bytes_per_param
    layer = round(per_layer * bpp)
    kv = round(2 * card.kv_heads * head_dim * card.kv_bytes_per_elem)
    embed = round(card.vocab * card.hidden * bpp)
    return ModelProfile(
        name=card.name,
        layer_bytes=(layer,) * card.layers,
        kv_bytes_per_token=(kv,) * card.layers,
        embed_bytes=embed,
        head_bytes=round((card.vocab * card.hidden + card.hidden) * bpp),
        tied_bytes=embed if card.tied_embeddings else 0,
        hidden=card.hidden,
        layer_expert_bytes=(round(expert_params * bpp),) * card.layers if expert_params else (),
        experts=card.experts,
        experts_per_token=card.experts_per_token,
        params=card_params(card),
        attention_dim=card.heads * head_dim,
    )
