"""Building blocks shared by every architecture: written once, used everywhere.

Norms, rotary positions, gated feed-forwards, causal masks, the standard KV cache
and the base class that states the model contract (see docs: forward, cache,
cache_bytes, absolute positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    """Root-mean-square norm: no mean subtraction, no bias (cheaper than LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """RoPE tables computed for the absolute positions asked for, so decoding never restarts at 0
    and positions beyond any training length are still defined."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        positions = torch.arange(start, start + length, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)  # [T, D/2]
        return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the last dim of x[B, H, T, D]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


class GatedFeedForward(nn.Module):
    """GLU feed-forward: down(act(gate(x)) * up(x)). SwiGLU with SiLU, GeGLU with GELU."""

    def __init__(self, dim: int, hidden: int, activation: str = "silu", bias: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.act = {"silu": F.silu, "gelu": F.gelu}[activation]
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.down.is_residual_proj = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(self.act(self.gate(x)) * self.up(x)))


def SwiGLU(dim: int, hidden: int, **kwargs) -> GatedFeedForward:  # noqa: N802 - reads like a layer
    return GatedFeedForward(dim, hidden, activation="silu", **kwargs)


def GeGLU(dim: int, hidden: int, **kwargs) -> GatedFeedForward:  # noqa: N802
    return GatedFeedForward(dim, hidden, activation="gelu", **kwargs)


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """Boolean [q_len, k_len] mask, True where attention is allowed.

    Queries are the *last* q_len positions of the k_len keys (bottom-right aligned), which is
    what a cached forward over new tokens needs.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    return k_pos <= q_pos


def sliding_window_mask(q_len: int, k_len: int, window: int, device: torch.device | None = None) -> Tensor:
    """Boolean [q_len, k_len] band: key j visible to query i iff 0 <= i - j < window (bottom-right aligned)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    distance = q_pos - k_pos
    return (distance >= 0) & (distance < window)


def attend(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0) -> Tensor:
    """Causal SDPA for q[B,H,Tq,D] against k,v[B,H,Tk,D] where the queries are the last Tq keys."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    if q_len == 1:  # one new token sees everything cached: no mask at all
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_len, k_len, q.device),
                                          dropout_p=dropout)


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused q/k/v, optional RoPE, any cache with `append(layer, k, v)`,
    and a pluggable kernel `kernel(q, k, v, dropout=...)` (full causal, sliding window, ...)."""

    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool, rotary: bool,
                 kernel: Callable[..., Tensor] = attend) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.proj.is_residual_proj = True
        self.rotary, self.kernel, self.dropout = rotary, kernel, dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, layer: int, rope: tuple[Tensor, Tensor] | None, cache=None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # keys are cached already rotated
        if cache is not None:
            k, v = cache.append(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache keeps the parameter dtype under autocast
        y = self.kernel(q, k, v, dropout=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class PreNormBlock(nn.Module):
    """x + attn(norm1(x)), then + ffn(norm2(x)): the residual block every decoder here uses."""

    def __init__(self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.ffn = norm1, attn, norm2, ffn

    def forward(self, x: Tensor, layer: int, rope: tuple[Tensor, Tensor] | None = None, cache=None) -> Tensor:
        x = x + self.attn(self.norm1(x), layer, rope, cache)
        return x + self.ffn(self.norm2(x))


class KVCache:
    """Preallocated keys and values for every layer plus the absolute position of the next token.

    `append` writes a layer's new keys/values at the current position; the model calls
    `advance` once after all layers have run.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.batch_size = batch_size
        self.pos = 0

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.pos + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}. "
                             "Start a new cache (generate() re-primes it with the latest context).")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


class LanguageModel(nn.Module):
    """The contract every architecture keeps.

    forward(idx[B,T], cache=None) -> logits[B,T,V]; with a cache from `new_cache`, the call
    continues at `cache.pos` and advances it. `max_context` is the longest sequence the
    model can attend over in one cache (None: unbounded, e.g. a rolling window).
    """

    max_context: int | None = None

    def new_cache(self, batch_size: int):  # pragma: no cover - every model overrides
        raise NotImplementedError

    def cache_bytes(self, seq_len: int) -> int:  # pragma: no cover
        raise NotImplementedError

    def kv_bytes(self, positions: int) -> int:
        """Bytes of a standard per-head K and V cache over `positions` (models with such a cache)."""
        return 2 * self.n_layer * self.n_head * self.head_dim * positions * self.param_dtype.itemsize

    def num_params(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return total

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def run_blocks(blocks: nn.ModuleList, x: Tensor, gradient_checkpointing: bool, **kwargs) -> Tensor:
    """Apply residual blocks in order, recomputing activations in backward when asked (saves memory)."""
    for i, block in enumerate(blocks):
        if gradient_checkpointing and torch.is_grad_enabled() and kwargs.get("cache") is None:
            x = checkpoint(block, x, layer=i, use_reentrant=False, **kwargs)
        else:
            x = block(x, layer=i, **kwargs)
    return x


def init_weights(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 init: N(0, std) for linears and embeddings, residual output projections scaled by
    1/sqrt(2·n_layer) so the residual stream's variance does not grow with depth. A module marks
    its residual projections with `is_residual_proj = True`."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * n_layer) if getattr(module, "is_residual_proj", False) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
