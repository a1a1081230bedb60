"""`gpt`: the nanoGPT-style baseline every other architecture is measured against.

Pre-norm decoder, fused causal SDPA, tied embeddings, GPT-2 residual init, learned or rotary
positions, optional grouped-query attention, a K/V cache for decoding.
"""

from __future__ import annotations

from torch import nn

from efficia.models.attention import CausalSelfAttention
from efficia.models.construction import require
from efficia.models.decoder import DecoderLM
from efficia.models.layers import MLP
from efficia.models.registry import register

GELU = {"exact": "none", "tanh": "tanh"}  # model.gelu -> F.gelu's `approximate`


@register("gpt")
class GPT(DecoderLM):
    """`bias` (nanoGPT's): biases in every linear layer but the head (attention and MLP) and in the LayerNorms.
    `gelu`: exact, or tanh (OpenAI's GPT-2); checkpoints from before the key existed are exact."""

    muon_matrices = (*DecoderLM.muon_matrices, "blocks.*.mixer.qkv.weight", "blocks.*.ffn.fc.weight",
                     "blocks.*.ffn.proj.weight")

    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, n_kv_head: int | None,
                 max_seq_len: int, dropout: float, ffn_hidden: int, bias: bool, pos_emb: str, rope_theta: float,
                 tie_embeddings: bool, gradient_checkpointing: bool, gelu: str = "exact") -> None:
        require(pos_emb in ("learned", "rope"), f"gpt: pos_emb must be 'learned' or 'rope', got {pos_emb!r}")
        require(gelu in GELU, f"gpt: gelu must be one of {', '.join(GELU)}, got {gelu!r}")
        self.learned_positions = pos_emb == "learned"
        rotary = rope_theta if pos_emb == "rope" else None
        super().__init__(vocab_size, d_model, n_layer, max_seq_len, dropout, gradient_checkpointing,
                         tie_embeddings=tie_embeddings,
                         mixer=lambda _: CausalSelfAttention(d_model, n_head, n_kv_head, dropout, bias, rotary,
                                                             max_len=max_seq_len),
                         ffn=lambda: MLP(d_model, ffn_hidden, dropout, bias, GELU[gelu]),
                         norm=lambda: nn.LayerNorm(d_model, bias=bias))
