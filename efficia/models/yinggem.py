"""`yinggem`: YingGem-T1, a pre-norm decoder with causal sliding-window attention.

Key j is visible to query i iff `0 <= i - j < window`. (The seed's mask cut only the lower edge
of the band and left the future visible.) RoPE at absolute positions, RMSNorm, GeGLU feed-forward,
untied LM head, and a rolling K/V cache of exactly `window` positions per layer, so decoding memory
is constant and decoding can go on past `max_seq_len` (the training context only). The kernel
(chunked banded SDPA, FlexAttention on CUDA) lives in `attention.py`.
"""

from __future__ import annotations

from efficia.models.attention import CausalSelfAttention
from efficia.models.blocks import GeGLU, PreNormBlock, RMSNorm
from efficia.models.decoder import DecoderLM
from efficia.models.registry import register


@register("yinggem")
class YingGem(DecoderLM):
    """`bias` applies to the q/k/v/o projections (the GeGLU has none)."""

    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, n_kv_head: int | None,
                 max_seq_len: int, dropout: float, window: int, ffn_hidden: int, rope_theta: float,
                 norm_eps: float, bias: bool, gradient_checkpointing: bool) -> None:
        self.window = window

        def make_block(_: int) -> PreNormBlock:
            attention = CausalSelfAttention(d_model, n_head, n_kv_head, dropout, bias, rope_theta, window=window)
            return PreNormBlock(RMSNorm(d_model, eps=norm_eps), attention, RMSNorm(d_model, eps=norm_eps),
                                GeGLU(d_model, ffn_hidden, dropout=dropout))

        super().__init__(name="yinggem", vocab_size=vocab_size, d_model=d_model, n_layer=n_layer,
                         max_seq_len=max_seq_len, dropout=dropout, make_block=make_block,
                         make_norm=lambda: RMSNorm(d_model, eps=norm_eps), learned_positions=False,
                         tie_embeddings=False, bounded_context=False, gradient_checkpointing=gradient_checkpointing)

    def structure(self) -> dict[str, int]:
        return {"window": self.window}
