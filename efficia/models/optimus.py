"""`optimus`: Optimus Prime, a pre-norm SwiGLU decoder with DeepSeek-V2 multi-head latent attention.

MLA (`attention: mla`): queries through a low-rank latent c_q = RMSNorm(x W_dq); keys and values through
c_kv = RMSNorm(x W_dkv) of rank d_c = `kv_rank` (d_q = `q_rank`), up-projected per head; a decoupled RoPE
part (per-head q_R, one k_R of width d_R shared by every head, rotated at absolute positions); scores
scaled by 1/sqrt(d_h + d_R). Training runs the expanded path (per-head K/V, causal multi-head SDPA);
decoding keeps ONLY c_kv and k_R per position ((d_c + d_R) numbers per layer, 0.27 of MHA's 2·d at the
seed sizes) and runs the absorbed path, W_uk folded into the query and W_uv applied after attention,
derived from the current weights at every call, so they never go stale after an optimizer step. The causal
mask holds in training and decoding alike, and RoPE continues at the cache's absolute positions.

`attention: gqa` swaps in the shared grouped-query attention with `n_kv_head` K/V heads, so the two
compare by config. The shared pieces live in `latent.py` (MLA and MTLA) and `attention.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from efficia.models.attention import CausalSelfAttention
from efficia.models.construction import check_heads, require
from efficia.models.decoder import GATED_FFN_MATRICES, LATENT_ATTENTION_MATRICES, DecoderLM, Mixer, Step
from efficia.models.kernels import attend
from efficia.models.latent import LatentHeads, LatentKV, LatentQuery, LatentState, recompute_in_backward
from efficia.models.layers import RMSNorm, SwiGLU
from efficia.models.registry import register


class MultiHeadLatentAttention(Mixer):
    """MLA as a mixer. `decode`: which path attends over the latent cache ("absorbed", or "expanded" to
    compare against); the cache itself is the same (c_kv, k_R) either way."""

    def __init__(self, d_model: int, n_head: int, d_c: int, d_q: int | None, d_rope: int, rope_theta: float,
                 dropout: float, decode: str, norm_eps: float) -> None:
        super().__init__()
        check_heads(d_model, n_head)
        require(decode in ("absorbed", "expanded"), f"optimus: decode must be 'absorbed' or 'expanded', got {decode!r}")
        self.head_dim = d_model // n_head
        self.d_c, self.d_rope, self.rope_theta = d_c, d_rope, rope_theta
        self.dropout, self.absorbed_decoding = dropout, decode == "absorbed"
        self.query = LatentQuery(d_model, n_head, self.head_dim, d_rope, d_q, norm_eps=norm_eps)
        self.kv = LatentKV(d_model, d_c, d_rope, norm_eps=norm_eps)
        self.heads = LatentHeads(n_head, d_c, self.head_dim)
        self.add_output(d_model, d_model, dropout)

    def forward(self, x: Tensor, step: Step, state: LatentState | None = None) -> Tensor:
        rope = step.rope(self.d_rope, self.rope_theta)  # absolute positions step.start .. start+T-1
        dropout = self.dropout if self.training else 0.0
        if state is None:  # training: the projections are recomputed in backward, only SDPA's tensors are kept
            q, k, v = recompute_in_backward(self.project, x, rope)  # [B,H,T,D+d_R] x2, [B,H,T,D]
            y = attend(q, k, v, dropout, scale=(self.head_dim + self.d_rope) ** -0.5)  # [B, H, T, D]
            return recompute_in_backward(self.out, y)  # y is kept by SDPA anyway; its [B,T,H·D] copy is not
        q_c, q_r = self.query(x, rope)  # [B, H, T, D], [B, H, T, d_R]
        c_kv, k_r = state.update(*self.kv(x, rope))  # [B, S, d_c], [B, S, d_R]: all the cache keeps, so far
        y = self.heads.attend(q_c, q_r, c_kv, k_r, absorbed=self.absorbed_decoding, is_causal=True,
                              dropout=dropout)  # [B, H, T, D]
        return self.out(y)  # [B, H, T, D] -> [B, T, C]

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x -> the expanded path's SDPA inputs q, k, v (per-head K/V from the latent, RoPE parts joined)."""
        return self.heads.expanded_qkv(*self.query(x, rope), *self.kv(x, rope))

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LatentState:
        return LatentState(batch_size, self.d_c, self.d_rope, device, dtype)

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        return LatentState.nbytes(seq_len, self.d_c, self.d_rope, dtype)


@register("optimus")
class Optimus(DecoderLM):
    """`kv_rank` and `q_rank` are the latent widths d_c and d_q (q_rank null: full-rank queries); `rope_dim` the
    decoupled RoPE width d_R. These and `decode` are read by `attention: mla` only, `n_kv_head` by `attention: gqa`
    only: the yaml makes the other setting's keys null (`${efficia.when:...}`), and a set key the chosen
    attention would ignore is refused."""

    muon_matrices = (*DecoderLM.muon_matrices, "blocks.*.mixer.qkv.weight", *LATENT_ATTENTION_MATRICES,
                     *GATED_FFN_MATRICES)

    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, n_kv_head: int | None,
                 max_seq_len: int, dropout: float, attention: str, kv_rank: int | None, q_rank: int | None,
                 rope_dim: int | None, rope_theta: float, decode: str | None, ffn_hidden: int, norm_eps: float,
                 tie_embeddings: bool, gradient_checkpointing: bool) -> None:
        require(attention in ("mla", "gqa"), f"optimus: attention must be 'mla' or 'gqa', got {attention!r}")
        if attention == "mla":
            require(n_kv_head is None, f"optimus: n_kv_head={n_kv_head} is read by attention=gqa only (MLA shares one "
                                       "latent across heads); set model.n_kv_head=null or model.attention=gqa")
            require(kv_rank is not None and kv_rank >= 1, f"optimus: kv_rank must be >= 1, got {kv_rank}")
            require(q_rank is None or q_rank >= 1, f"optimus: q_rank must be >= 1 or null, got {q_rank}")
            require(rope_dim is not None and rope_dim >= 2 and rope_dim % 2 == 0,
                    f"optimus: rope_dim must be even and >= 2, got {rope_dim}")
        else:
            ignored = [k for k, v in (("kv_rank", kv_rank), ("q_rank", q_rank), ("rope_dim", rope_dim),
                                      ("decode", decode)) if v is not None]
            require(not ignored, f"optimus: {', '.join(ignored)} are read by attention=mla only; set "
                                 f"{' '.join(f'model.{k}=null' for k in ignored)} or model.attention=mla")

        def mixer(_: int) -> Mixer:
            if attention == "gqa":
                return CausalSelfAttention(d_model, n_head, n_kv_head, dropout, rope_theta=rope_theta,
                                           max_len=max_seq_len)
            return MultiHeadLatentAttention(d_model, n_head, kv_rank, q_rank, rope_dim, rope_theta, dropout, decode,
                                            norm_eps)

        super().__init__(vocab_size, d_model, n_layer, max_seq_len, dropout, gradient_checkpointing,
                         tie_embeddings=tie_embeddings, mixer=mixer,
                         ffn=lambda: SwiGLU(d_model, ffn_hidden, dropout=dropout),
                         norm=lambda: RMSNorm(d_model, eps=norm_eps))
