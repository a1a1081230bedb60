"""`yinggem`: YingGem-T1, a pre-norm decoder with causal sliding-window attention.

Key j is visible to query i iff `0 <= i - j < window`. (The seed's mask cut only the lower edge
of the band and left the future visible.) RoPE at absolute positions, RMSNorm, GeGLU feed-forward,
untied LM head, and a rolling KV cache of exactly `window` positions per layer, so decoding memory
is constant and decoding can go on past `max_seq_len` (`max_context = None`).

Which attention path runs where (`sliding_window_attention`):

- keys <= window (short sequences, single-token decoding, short cached chunks): every key in the
  causal triangle is inside the band, so plain causal SDPA is exact and is used.
- CUDA, full sequence (no cache), no attention dropout, FlexAttention importable: compiled
  `flex_attention` with a sliding-window block mask (blocks outside the band are skipped). If it
  fails once (compile error, unsupported shape), a warning is issued and the chunked path is used
  from then on.
- everywhere else, and always for CPU training (FlexAttention refuses backward on CPU): chunked
  banded SDPA. Queries are cut into chunks of `window`; chunk c sees the 2·window keys starting
  `window` before it, gathered with `unfold` (a strided view, no Python loop over chunks), and one
  SDPA call over [B·H, n_chunks, window, 2·window] scores with a single [window, 2·window] band
  mask (cached); the first chunk, which has fewer keys behind it, is a second, small SDPA call.
  Time and memory are O(T·window); no T×T mask is ever built.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efficia.models.blocks import (
    GeGLU,
    KVCache,
    LanguageModel,
    PreNormBlock,
    RMSNorm,
    RotaryEmbedding,
    SelfAttention,
    attend,
    init_weights,
    run_blocks,
    sliding_window_mask,
)
from efficia.models.registry import register

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: chunked path only
    create_block_mask = flex_attention = None

_FLEX = {"enabled": flex_attention is not None, "compiled": None}


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, dropout: float = 0.0) -> Tensor:
    """Causal sliding-window attention for q[B,H,Tq,D] against k,v[B,H,Tk,D], Tk >= Tq.

    The queries are the last Tq of the Tk keys (bottom-right aligned, as in a cached call): query i
    sits at key index Tk - Tq + i and sees key j iff 0 <= (Tk - Tq + i) - j < window.
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    if k_len < q_len:
        raise ValueError(f"sliding_window_attention: {q_len} queries but only {k_len} keys")
    if k_len <= window:  # the whole causal triangle lies inside the band
        return attend(q, k, v, dropout)
    if q.is_cuda and q_len == k_len and dropout == 0.0 and _FLEX["enabled"]:
        try:
            return flex_sliding_window_attention(q, k, v, window)
        except Exception as err:  # any failure: fall back, once, loudly
            _FLEX["enabled"] = False
            warnings.warn(f"yinggem: FlexAttention failed ({err!r}); using chunked SDPA from now on",
                          stacklevel=2)
    return chunked_sliding_window_attention(q, k, v, window, dropout)


def chunked_sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int,
                                     dropout: float = 0.0) -> Tensor:
    """Banded attention in O(Tq·window): same semantics as `sliding_window_attention`."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    offset = k_len - q_len
    if offset >= window:
        # keys older than `window` before the first query are never seen
        return _uniform_chunks(q, k[..., offset - window:, :], v[..., offset - window:, :], window, dropout)
    # The first chunk of queries has fewer than `window` keys before it: attend it on its own
    # (its keys fit in < 2·window), then the rest is uniform with exactly `window` keys of history.
    n0 = min(window, q_len)
    q0, k0, v0 = q[..., :n0, :], k[..., :offset + n0, :], v[..., :offset + n0, :]
    if offset + n0 <= window:
        out0 = attend(q0, k0, v0, dropout)
    else:
        mask = sliding_window_mask(n0, offset + n0, window, q.device)
        out0 = F.scaled_dot_product_attention(q0, k0, v0, attn_mask=mask, dropout_p=dropout)
    if n0 == q_len:
        return out0
    if offset:
        k, v = k[..., offset:, :], v[..., offset:, :]
    rest = _uniform_chunks(q[..., n0:, :], k, v, window, dropout)
    return torch.cat((out0, rest), dim=-2)


def _uniform_chunks(q: Tensor, k: Tensor, v: Tensor, window: int, dropout: float) -> Tensor:
    """q[B,H,Tq,D] with k,v[B,H,Tq+window,D]: query chunk c (queries c·w .. c·w+w-1) sees key
    rows c·w .. c·w+2w-1, a 2w-wide slab of which the band mask keeps w per query.

    Layout [B·H, n_chunks, ·, D]: the chunks take SDPA's head dimension, so q is a free view and
    k, v an overlapping strided view (unfold), and one [w, 2w] mask serves every chunk."""
    B, H, q_len, D = q.shape
    n_chunks = -(-q_len // window)
    pad = n_chunks * window - q_len
    if pad:  # padded queries are dropped at the end; padded keys lie outside every real query's band
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q = q.reshape(B * H, n_chunks, window, D)
    # unfold: [B,H,n_chunks,D,2w] overlapping view -> [B·H, n_chunks, 2w, D]
    k = k.unfold(2, 2 * window, window).transpose(-1, -2).reshape(B * H, n_chunks, 2 * window, D)
    v = v.unfold(2, 2 * window, window).transpose(-1, -2).reshape(B * H, n_chunks, 2 * window, D)
    band = _band_mask(window, str(q.device), q.dtype, torch.is_inference_mode_enabled())
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout)
    out = out.view(B, H, n_chunks * window, D)
    return out[..., :q_len, :] if pad else out


@functools.lru_cache(maxsize=32)
def _band_mask(window: int, device: str, dtype: torch.dtype, inference: bool) -> Tensor:
    """Additive [w, 2w] band mask (0 inside, -inf outside), made once per window/device/dtype.
    `inference` is part of the key: a tensor made under inference_mode cannot be saved for backward."""
    allowed = sliding_window_mask(window, 2 * window, window, torch.device(device))
    return torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(~allowed, float("-inf"))


@functools.lru_cache(maxsize=32)
def _flex_band_mask(seq_len: int, window: int, device: str, inference: bool):
    def band(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < window)

    return create_block_mask(band, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


def flex_sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int,
                                  compiled: bool = True) -> Tensor:
    """Full-sequence (Tq == Tk) sliding-window attention with FlexAttention and a block mask.

    `compiled=False` runs FlexAttention eagerly (slow, materialises scores; for tests only).
    """
    block_mask = _flex_band_mask(q.shape[-2], window, str(q.device), torch.is_inference_mode_enabled())
    fn = flex_attention
    if compiled:
        if _FLEX["compiled"] is None:
            _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
        fn = _FLEX["compiled"]
    return fn(q, k, v, block_mask=block_mask)


class RollingKVCache(KVCache):
    """The keys/values of the last `window` positions of every layer, in a ring (slot = position %
    window), plus `pos`, the absolute position of the next token. Its size never grows.

    `append` stores a layer's new keys and returns what the new queries attend over; the model calls
    `advance` once after all layers have run.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, window: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(n_layer, batch_size, n_head, window, head_dim, device, dtype)
        self.window = window

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k,v[B,H,T,D] at positions pos .. pos+T-1 and return the context keys/values.

        T == 1: the filled ring slots (order does not matter: all of them are inside the band).
        T > 1: the cached keys of the `window - 1` positions before pos, in position order,
        followed by the T new ones, so that the new queries are the last T keys (bottom-right).
        """
        T, w, pos = k.shape[-2], self.window, self.pos
        ring_k, ring_v = self.k[layer], self.v[layer]
        if T == 1:
            slot = pos % w
            ring_k[:, :, slot] = k[:, :, 0]
            ring_v[:, :, slot] = v[:, :, 0]
            filled = min(pos + 1, w)
            return ring_k[:, :, :filled], ring_v[:, :, :filled]
        n_prev = min(pos, w - 1)
        prev = torch.arange(pos - n_prev, pos, device=k.device) % w
        k_ctx = torch.cat((ring_k[:, :, prev].to(k.dtype), k), dim=2)
        v_ctx = torch.cat((ring_v[:, :, prev].to(v.dtype), v), dim=2)
        keep = min(T, w)  # only the last `window` new positions can ever be seen again
        slots = torch.arange(pos + T - keep, pos + T, device=k.device) % w
        ring_k[:, :, slots] = k[:, :, T - keep:].to(ring_k.dtype)
        ring_v[:, :, slots] = v[:, :, T - keep:].to(ring_v.dtype)
        return k_ctx, v_ctx


def block(d_model: int, n_head: int, window: int, ffn_hidden: int, dropout: float, bias: bool,
          norm_eps: float) -> PreNormBlock:
    attention = SelfAttention(d_model, n_head, dropout, bias, rotary=True,
                              kernel=functools.partial(sliding_window_attention, window=window))
    return PreNormBlock(RMSNorm(d_model, eps=norm_eps), attention, RMSNorm(d_model, eps=norm_eps),
                        GeGLU(d_model, ffn_hidden, dropout=dropout))


@register("yinggem")
class YingGem(LanguageModel):
    """YingGem-T1. `bias` applies to the q/k/v/o projections (the GeGLU has none); `max_seq_len` is
    the training context only: attention never looks further back than `window`, positions are
    absolute RoPE, so any length can be processed and decoded (`max_context = None`)."""

    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, max_seq_len: int,
                 dropout: float, window: int, ffn_hidden: int, rope_theta: float, norm_eps: float,
                 bias: bool, gradient_checkpointing: bool) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"yinggem: window must be >= 1, got {window}")
        if d_model % n_head:
            raise ValueError(f"yinggem: d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, d_model // n_head
        self.window = window
        self.max_seq_len = max_seq_len
        self.max_context = None
        self.gradient_checkpointing = gradient_checkpointing
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.rope = RotaryEmbedding(self.head_dim, theta=rope_theta)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            block(d_model, n_head, window, ffn_hidden, dropout, bias, norm_eps) for _ in range(n_layer)
        )
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)  # untied
        init_weights(self, n_layer)

    def new_cache(self, batch_size: int) -> RollingKVCache:
        return RollingKVCache(self.n_layer, batch_size, self.n_head, self.window, self.head_dim,
                              self.device, self.param_dtype)

    def cache_bytes(self, seq_len: int) -> int:
        return self.kv_bytes(min(seq_len, self.window))

    def forward(self, idx: Tensor, cache: RollingKVCache | None = None) -> Tensor:
        B, T = idx.shape
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"yinggem: cache was made for batch size {cache.batch_size}, got {B}")
        start = cache.pos if cache is not None else 0
        x = self.drop(self.tok_emb(idx))
        rope = self.rope(start, T)
        x = run_blocks(self.blocks, x, self.gradient_checkpointing, rope=rope, cache=cache)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.norm(x))
