"""`yinggem`: YingGem-T1, a pre-norm decoder with causal sliding-window attention.

Key j is visible to query i iff `0 <= i - j < window`: both edges of the band are cut, so no future
key is visible. RoPE at absolute positions, RMSNorm, GeGLU feed-forward
(`LeanGatedFeedForward`: two of its four hidden-wide activations recomputed in backward, not kept),
untied LM head, and a rolling K/V cache of exactly `window` positions per layer, so decoding memory
is constant and decoding can go on past `max_seq_len` (the training context only). The kernel
(chunked banded SDPA, FlexAttention on CUDA) lives in `attention.py`.
"""

from __future__ import annotations

from efficia.models.attention import CausalSelfAttention
from efficia.models.decoder import GATED_FFN_MATRICES, DecoderLM
from efficia.models.layers import LeanGatedFeedForward, RMSNorm
from efficia.models.registry import register


@register("yinggem")
class YingGem(DecoderLM):
    """`attention_bias`: biases on the q/k/v/o projections, nowhere else (the GeGLU and the RMSNorms have none)."""

    bounded_context = False
    muon_matrices = (*DecoderLM.muon_matrices, "blocks.*.mixer.qkv.weight", *GATED_FFN_MATRICES)

    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, n_kv_head: int | None,
                 max_seq_len: int, dropout: float, window: int, ffn_hidden: int, rope_theta: float,
                 norm_eps: float, attention_bias: bool, tie_embeddings: bool, gradient_checkpointing: bool) -> None:
        self.window = window
        super().__init__(vocab_size, d_model, n_layer, max_seq_len, dropout, gradient_checkpointing,
                         tie_embeddings=tie_embeddings,
                         mixer=lambda _: CausalSelfAttention(d_model, n_head, n_kv_head, dropout, attention_bias,
                                                             rope_theta, window=window),
                         ffn=lambda: LeanGatedFeedForward(d_model, ffn_hidden, "gelu", dropout=dropout),
                         norm=lambda: RMSNorm(d_model, eps=norm_eps))
