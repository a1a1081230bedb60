"""Attention kernels, written once: every model reaches scaled-dot-product attention through this module, so one
switch (`gpu_attention_on_cpu`) and one cache (`memoize`, `clear_caches`) reach all of them.

- `sdpa`: F.scaled_dot_product_attention (values narrower than the keys padded on a CPU, for its fused kernel).
- `attend`: causal SDPA with the queries bottom-right aligned (a cached call), grouped-query K/V; on a CPU with
  dropout, `attention_with_dropout` (SDPA's CPU kernels have no dropout).
- `attend_with_own_term` and its sink helpers: one more softmax term per query, still one fused SDPA call.
- `softmax_with_lse`: an explicit attention whose log-sum-exp joins a larger softmax.
- masks (`causal_mask`, `sliding_window_mask`) and `expand_kv` for kernels without grouped-query support.
- `sliding_window_attention`: key j visible to query i iff 0 <= i - j < window. Which path runs where:

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
    mask (memoised). Time and memory are O(T·window); no T×T mask is ever built.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from efficia.models.layers import dropout

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: chunked path only
    create_block_mask = flex_attention = None

_FLEX = {"enabled": flex_attention is not None, "compiled": None}
_GPU_ATTENTION = {"on": False}  # set by `gpu_attention_on_cpu` only
_MEMOISED: list[Any] = []  # every `memoize`d function, for `clear_caches`


@contextlib.contextmanager
def gpu_attention_on_cpu() -> Iterator[None]:
    """Inside, attention dropout is taken as CUDA's fused SDPA takes it: inside the kernel, which keeps a random
    seed for backward, not [Tq, Tk] probabilities, so its memory is that of SDPA without dropout. `sdpa` passes
    dropout_p=0.0 to torch and `attend` does not take the CPU's explicit dropout path (which keeps the
    probabilities and their mask). For measuring a GPU step on a CPU (efficia.plan), not for training: no
    attention weight is dropped inside. The models' own dropout layers (residual, feed-forward) run as
    configured. The previous setting is restored on exit, so it nests."""
    before = _GPU_ATTENTION["on"]
    _GPU_ATTENTION["on"] = True
    try:
        yield
    finally:
        _GPU_ATTENTION["on"] = before


def memoize(maxsize: int = 32) -> Callable[[Callable], Callable]:
    """functools.lru_cache(maxsize) for masks and tables model code makes once per shape, registered with
    `clear_caches`. A tensor made under inference_mode cannot be saved for backward, so a memoised function
    whose tensors backward may save takes `torch.is_inference_mode_enabled()` as an argument (one entry per mode)."""

    def wrap(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _MEMOISED.append(cached)
        return cached

    return wrap


def clear_caches() -> None:
    """Drop every memoised mask and table (`memoize`): a fake tensor must never outlive a fake run (efficia.plan
    measures on fake tensors), nor a real one enter it."""
    for cached in _MEMOISED:
        cached.cache_clear()


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """F.scaled_dot_product_attention, except that on a CPU values narrower than the keys (MLA's decoupled RoPE
    key) are zero-padded to the key width: the fused CPU kernel needs one head size, and without it SDPA falls
    back to materialising [Tq, Tk] scores (optimus at T=8192: 6.5 GB). The padded columns are sliced off.
    Inside `gpu_attention_on_cpu` dropout_p is 0.0."""
    if _GPU_ATTENTION["on"] and kwargs.get("dropout_p"):
        kwargs["dropout_p"] = 0.0
    d_v, d_qk = v.shape[-1], q.shape[-1]
    if q.device.type == "cpu" and d_v < d_qk:
        return F.scaled_dot_product_attention(q, k, F.pad(v, (0, d_qk - d_v)), **kwargs)[..., :d_v]
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def attend(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0, scale: float | None = None) -> Tensor:
    """Causal SDPA for q[B,H,Tq,D] against k,v[B,Hkv,Tk,D] where the queries are the last Tq keys.
    Hkv may divide H (grouped-query attention: SDPA shares each K/V head among H/Hkv query heads)."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    # SDPA's CPU kernels have no dropout: it would take its math path and the slow bernoulli_ mask
    if dropout > 0.0 and q.device.type == "cpu" and not _GPU_ATTENTION["on"]:
        return attention_with_dropout(q, k, v, dropout, scale)
    gqa = k.shape[1] != q.shape[1]
    if q_len == k_len:
        return sdpa(q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
    if q_len == 1:  # one new token sees everything cached: no mask at all
        return sdpa(q, k, v, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    return sdpa(q, k, v, attn_mask=causal_mask(q_len, k_len, q.device), dropout_p=dropout, scale=scale,
                enable_gqa=gqa)


def attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, p: float, scale: float | None = None) -> Tensor:
    """What SDPA's math path computes under dropout (causal, bottom-right aligned, GQA), with `dropout`'s mask."""
    k, v = expand_kv(q, k, v)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)  # [B, H, Tq, Tk]
    scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return dropout(scores.softmax(-1), p) @ v  # [B, H, Tq, D]


def attend_with_own_term(q: Tensor, k: Tensor, v: Tensor, own_score: Tensor, own_value: Tensor | None, *,
                         is_causal: bool, scale: float, dropout: float = 0.0) -> Tensor:
    """One softmax over SDPA's keys k,v[B,Hkv,Tk,·] plus one more term per query, whose score own_score[B,H,Tq]
    (already scaled) and value own_value[B,H,Tq,Dv] differ per query (an own running sum, or a whole
    attention result folded in as its log-sum-exp and output). Exact, and still one fused SDPA call: the own
    term enters as a sink key at index 0, [0..0, 1], met by an extra query feature own_score/scale, with value
    [0..0, 1]; the last output column is then the own term's softmax weight p, and the result is
    out[:Dv] + p·own_value. is_causal: query i sees sink + keys 0..i-1 (Tq == Tk + 1); else every key.
    own_value None: return out [B,H,Tq,Dv+1] itself (p last), for a caller that adds p·own_value where it
    can recompute own_value in backward instead of keeping it (efficientlm's training path)."""
    k, v = with_sink(k, v)
    if own_value is not None:
        return attend_sink(q, k, v, own_score, own_value, is_causal=is_causal, scale=scale, dropout=dropout)
    q = torch.cat((q, (own_score / scale).unsqueeze(-1).to(q.dtype)), dim=-1)  # [B, H, Tq, Dq + 1]
    return sdpa(q, k, v, is_causal=is_causal, scale=scale, dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1])


def with_sink(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """k,v[B,Hkv,Tk,·] -> [B,Hkv,1+Tk,·+1]: the sink key [0..0, 1] / value [0..0, 1] first, a zero feature
    on every other key and value (see `attend_with_own_term`). Build once, pass prefixes of it."""
    B, Hkv = k.shape[:2]
    sink_k = F.pad(k.new_ones(B, Hkv, 1, 1), (k.shape[-1], 0))  # [B, Hkv, 1, Dq + 1]: the extra feature only
    sink_v = F.pad(v.new_ones(B, Hkv, 1, 1), (v.shape[-1], 0))
    return torch.cat((sink_k, F.pad(k, (0, 1))), dim=2), torch.cat((sink_v, F.pad(v, (0, 1))), dim=2)


def attend_sink(q: Tensor, k: Tensor, v: Tensor, own_score: Tensor, own_value: Tensor, *, is_causal: bool,
                scale: float, dropout: float = 0.0) -> Tensor:
    """`attend_with_own_term` over keys/values already made by `with_sink`."""
    Dv = v.shape[-1] - 1
    q = torch.cat((q, (own_score / scale).unsqueeze(-1).to(q.dtype)), dim=-1)  # [B, H, Tq, Dq + 1]
    out = sdpa(q, k, v, is_causal=is_causal, scale=scale, dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1])
    return out[..., :Dv] + out[..., Dv:] * own_value  # [B, H, Tq, Dv]


def with_sinks(k: Tensor, v: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """`with_sink` with `count` identical sinks first: [B,Hkv,count+Tk,·+1]. A causal layout whose first queries
    must see nothing but their own term needs more than one: a query that sees m sinks gives its own term m
    equal shares, so `attend_sink` stays exact when the query's own score is lowered by log(m)."""
    k, v = with_sink(k, v)
    if count == 1:
        return k, v
    extra = (-1, -1, count - 1, -1)
    return torch.cat((k[:, :, :1].expand(extra), k), dim=2), torch.cat((v[:, :, :1].expand(extra), v), dim=2)


def attend_sink_masked(q: Tensor, k: Tensor, v: Tensor, own_score: Tensor, own_value: Tensor, *, attn_mask: Tensor,
                       scale: float, dropout: float = 0.0) -> Tensor:
    """`attend_sink` under a boolean attn_mask [Tq, Tk] (True = visible), for layouts that are not causal from the
    top-left corner (a cached call's past keys). Every row must see at least one sink."""
    Dv = v.shape[-1] - 1
    q = torch.cat((q, (own_score / scale).unsqueeze(-1).to(q.dtype)), dim=-1)  # [B, H, Tq, Dq + 1]
    out = sdpa(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1])
    return out[..., :Dv] + out[..., Dv:] * own_value  # [B, H, Tq, Dv]


class _SoftmaxWithLSE(torch.autograd.Function):
    """(softmax, logsumexp) of the last dim, keeping only the softmax for backward."""

    @staticmethod
    def forward(ctx, scores: Tensor) -> tuple[Tensor, Tensor]:
        lse = scores.logsumexp(-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        ctx.save_for_backward(probs)
        return probs, lse

    @staticmethod
    def backward(ctx, grad_probs: Tensor, grad_lse: Tensor) -> Tensor:
        (probs,) = ctx.saved_tensors
        inner = grad_probs - (grad_probs * probs).sum(-1, keepdim=True) + grad_lse.unsqueeze(-1)
        return probs * inner


def softmax_with_lse(scores: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(scores, -1) and logsumexp(scores, -1), both differentiable, for an explicit attention whose
    log-sum-exp joins a larger softmax (as a sink term). Backward keeps the probabilities only, not the scores
    as well (what `softmax` plus `logsumexp` would keep). Rows must have at least one finite score."""
    return _SoftmaxWithLSE.apply(scores)


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


def expand_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Repeat each of Hkv K/V heads H/Hkv times for kernels without native grouped-query support."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, Tk, D]


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, dropout: float = 0.0) -> Tensor:
    """Causal sliding-window attention for q[B,H,Tq,D] against k,v[B,Hkv,Tk,D], Tk >= Tq.

    The queries are the last Tq of the Tk keys (bottom-right aligned, as in a cached call): query i
    sits at key index Tk - Tq + i and sees key j iff 0 <= (Tk - Tq + i) - j < window.
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    if k_len < q_len:
        raise ValueError(f"sliding_window_attention: {q_len} queries but only {k_len} keys")
    if k_len <= window:  # the whole causal triangle lies inside the band
        return attend(q, k, v, dropout)
    k, v = expand_kv(q, k, v)
    if q.is_cuda and q_len == k_len and dropout == 0.0 and _FLEX["enabled"]:
        try:
            return flex_sliding_window_attention(q, k, v, window)
        except Exception as err:  # any failure: fall back, once, loudly
            _FLEX["enabled"] = False
            warnings.warn(f"FlexAttention failed ({err!r}); using chunked SDPA from now on", stacklevel=2)
    return chunked_sliding_window_attention(q, k, v, window, dropout)


def chunked_sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int,
                                     dropout: float = 0.0) -> Tensor:
    """Banded attention in O(Tq·window): same semantics as `sliding_window_attention` (k, v expanded)."""
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
        out0 = sdpa(q0, k0, v0, attn_mask=mask, dropout_p=dropout)
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
    k, v an overlapping strided view (unfold), and one [w, 2w] mask serves every chunk. Merging B and H
    is a view of a projection's transposed output only for B = 1; for B > 1 k and v are made
    contiguous per head first (one copy each, where reshaping the unfold view would copy both windows)."""
    B, H, q_len, D = q.shape
    n_chunks = -(-q_len // window)
    pad = n_chunks * window - q_len
    if pad:  # padded queries are dropped at the end; padded keys lie outside every real query's band
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    elif B > 1:  # per-head contiguous: then [B·H, n_chunks, 2w, D] below is a view, not a 2x copy kept for backward
        k, v = k.contiguous(), v.contiguous()
    q = q.reshape(B * H, n_chunks, window, D)
    # unfold: [B,H,n_chunks,D,2w] overlapping view -> [B·H, n_chunks, 2w, D]
    k = k.unfold(2, 2 * window, window).transpose(-1, -2).reshape(B * H, n_chunks, 2 * window, D)
    v = v.unfold(2, 2 * window, window).transpose(-1, -2).reshape(B * H, n_chunks, 2 * window, D)
    band = _band_mask(window, str(q.device), q.dtype, torch.is_inference_mode_enabled())
    out = sdpa(q, k, v, attn_mask=band, dropout_p=dropout)
    out = out.view(B, H, n_chunks * window, D)
    return out[..., :q_len, :] if pad else out


@memoize()
def _band_mask(window: int, device: str, dtype: torch.dtype, inference: bool) -> Tensor:
    """Additive [w, 2w] band mask (0 inside, -inf outside), made once per window/device/dtype.
    `inference` is part of the key: a tensor made under inference_mode cannot be saved for backward."""
    allowed = sliding_window_mask(window, 2 * window, window, torch.device(device))
    return torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def sliding_window_block_mask(seq_len: int, window: int, device: torch.device | str):
    """FlexAttention's BlockMask of the band over a whole sequence of `seq_len` (Tq == Tk), memoised."""
    return _flex_band_mask(seq_len, window, str(device), torch.is_inference_mode_enabled())


@memoize()
def _flex_band_mask(seq_len: int, window: int, device: str, inference: bool):
    def band(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < window)

    return create_block_mask(band, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


def flex_sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Full-sequence (Tq == Tk) sliding-window attention: compiled FlexAttention with the band's block mask
    (`sliding_window_block_mask`), which skips the blocks outside the band."""
    if _FLEX["compiled"] is None:
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["compiled"](q, k, v, block_mask=sliding_window_block_mask(q.shape[-2], window, q.device))
