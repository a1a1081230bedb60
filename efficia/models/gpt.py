"""`gpt`: the nanoGPT-style baseline every other architecture is measured against.

Pre-norm decoder, fused causal SDPA, tied embeddings, GPT-2 residual init, learned or
rotary positions, a preallocated KV cache for decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efficia.models.blocks import (
    KVCache,
    LanguageModel,
    PreNormBlock,
    RotaryEmbedding,
    SelfAttention,
    init_weights,
    run_blocks,
)
from efficia.models.registry import register


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.proj = nn.Linear(4 * d_model, d_model, bias=bias)
        self.proj.is_residual_proj = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


def block(d_model: int, n_head: int, dropout: float, bias: bool, rotary: bool) -> PreNormBlock:
    return PreNormBlock(nn.LayerNorm(d_model, bias=bias), SelfAttention(d_model, n_head, dropout, bias, rotary),
                        nn.LayerNorm(d_model, bias=bias), MLP(d_model, dropout, bias))


@register("gpt")
class GPT(LanguageModel):
    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, max_seq_len: int,
                 dropout: float, bias: bool, pos_emb: str, gradient_checkpointing: bool) -> None:
        super().__init__()
        if pos_emb not in ("learned", "rope"):
            raise ValueError(f"gpt: pos_emb must be 'learned' or 'rope', got {pos_emb!r}")
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, d_model // n_head
        self.max_seq_len = self.max_context = max_seq_len
        self.gradient_checkpointing = gradient_checkpointing
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model) if pos_emb == "learned" else None
        self.rope = RotaryEmbedding(self.head_dim) if pos_emb == "rope" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            block(d_model, n_head, dropout, bias, rotary=pos_emb == "rope") for _ in range(n_layer)
        )
        self.norm = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        init_weights(self, n_layer)

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.n_layer, batch_size, self.n_head, self.max_seq_len, self.head_dim,
                       self.device, self.param_dtype)

    def cache_bytes(self, seq_len: int) -> int:
        return self.kv_bytes(min(seq_len, self.max_seq_len))

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.max_seq_len:
            raise ValueError(f"gpt: sequence of {start + T} tokens exceeds max_seq_len={self.max_seq_len}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        rope = self.rope(start, T) if self.rope is not None else None
        x = run_blocks(self.blocks, self.drop(x), self.gradient_checkpointing, rope=rope, cache=cache)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.norm(x))
