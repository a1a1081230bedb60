"""Causal self-attention as a mixer: full or sliding-window, multi-head or grouped-query, with the
decoding state each variant needs (a growing K/V cache, or a ring of exactly `window` positions).

Grouped-query attention (`n_kv_head` K/V heads shared by groups of query heads; null = one per head):

    n_head=6, n_kv_head=2:   query heads  q0 q1 q2 | q3 q4 q5
                             K/V heads       kv0   |   kv1

Sliding window (`window`): key j is visible to query i iff 0 <= i - j < window. The kernels (`attend`,
`sliding_window_attention`: chunked banded SDPA, FlexAttention on CUDA) live in `kernels.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from efficia.models.construction import check_heads, require
from efficia.models.decoder import Mixer, Step
from efficia.models.kernels import attend, sliding_window_attention
from efficia.models.layers import apply_rope


def reserved_positions(n: int, limit: int | None = None) -> int:
    """Positions a growing K/V cache has allocated after `n`: n rounded up to a power of two, but never
    past `limit` (max_seq_len) when n fits in it. Depends on n only, not on how the tokens came in."""
    if n <= 0:
        return 0
    capacity = 1 << (n - 1).bit_length()
    return min(capacity, limit) if limit is not None and n <= limit else capacity


class KVState:
    """Keys and values of every position so far. Held in buffers [B, Hkv, capacity, D] whose capacity
    doubles when full (`reserved_positions`), so appending a token writes it in place and the cache is
    copied O(log T) times in all (appending by torch.cat would copy the whole cache on every token: O(T²)).
    `update` returns views of the filled positions."""

    def __init__(self, batch_size: int, n_kv_head: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype, limit: int | None = None) -> None:
        self.limit, self.length = limit, 0
        self.k_buf = torch.zeros(batch_size, n_kv_head, 0, head_dim, device=device, dtype=dtype)
        self.v_buf = torch.zeros_like(self.k_buf)

    @property
    def k(self) -> Tensor:
        return self.k_buf[:, :, :self.length]

    @property
    def v(self) -> Tensor:
        return self.v_buf[:, :, :self.length]

    def update(self, k: Tensor, v: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """Append k,v[B,Hkv,T,D] (positions pos..pos+T-1) and return every key/value so far."""
        if pos != self.length:
            raise ValueError(f"KV cache holds {self.length} positions but the call starts at {pos}; "
                             "feed a cache its tokens in order, once")
        end = pos + k.shape[-2]
        if end > self.k_buf.shape[-2]:
            B, H, _, D = self.k_buf.shape
            capacity = reserved_positions(end, self.limit)
            k_buf = self.k_buf.new_empty(B, H, capacity, D)
            v_buf = self.v_buf.new_empty(B, H, capacity, D)
            k_buf[:, :, :pos] = self.k
            v_buf[:, :, :pos] = self.v
            self.k_buf, self.v_buf = k_buf, v_buf
        self.k_buf[:, :, pos:end] = k  # copy_ casts to the cache dtype
        self.v_buf[:, :, pos:end] = v
        self.length = end
        return self.k, self.v


class RingKVState:
    """Keys and values of the last `window` positions, position p in slot p % window once full, so
    decoding memory is constant whatever the length (the ring grows to `window` exactly, never more)."""

    def __init__(self, window: int, batch_size: int, n_kv_head: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.window = window
        self.k = torch.zeros(batch_size, n_kv_head, 0, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k: Tensor, v: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """Store k,v[B,Hkv,T,D] at positions pos..pos+T-1 and return what the new queries attend over.

        T == 1 on a full ring: the ring itself (order does not matter: every slot is inside the band).
        Otherwise: the cached `window - 1` positions before pos in position order, then the T new ones,
        so the new queries are the last T keys (bottom-right aligned).
        """
        T, w, held = k.shape[-2], self.window, self.k.shape[-2]  # held == min(pos, w)
        if T == 1 and held == w:
            slot = pos % w
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            return self.k, self.v
        order = torch.arange(pos - min(pos, w - 1), pos, device=k.device) % w
        k_ctx = torch.cat((self.k[:, :, order].to(k.dtype), k), dim=2)
        v_ctx = torch.cat((self.v[:, :, order].to(v.dtype), v), dim=2)
        end = pos + T
        if end <= w:  # still filling: slot == position (grows by cat: at most `window` positions, ever)
            self.k = torch.cat((self.k, k.to(self.k.dtype)), dim=2)
            self.v = torch.cat((self.v, v.to(self.v.dtype)), dim=2)
        elif held < w:  # fills up now: keep the last w positions, position p at slot p % w
            shift = (end - w) % w
            self.k = torch.cat((self.k, k.to(self.k.dtype)), dim=2)[:, :, -w:].roll(shift, dims=2)
            self.v = torch.cat((self.v, v.to(self.v.dtype)), dim=2)[:, :, -w:].roll(shift, dims=2)
        else:
            keep = min(T, w)  # only the last `window` new positions can ever be seen again
            slots = torch.arange(end - keep, end, device=k.device) % w
            self.k[:, :, slots] = k[:, :, T - keep:].to(self.k.dtype)
            self.v[:, :, slots] = v[:, :, T - keep:].to(self.v.dtype)
        return k_ctx, v_ctx


class CausalSelfAttention(Mixer):
    """Fused q/k/v projection, optional RoPE at absolute positions (`rope_theta`; None = no rotation,
    e.g. with learned position embeddings), full causal or sliding-window kernel, GQA by `n_kv_head`.
    `max_len` (the model's max_seq_len, when its context is bounded) caps a full cache's capacity."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None = None, dropout: float = 0.0,
                 bias: bool = False, rope_theta: float | None = 10000.0, window: int | None = None,
                 max_len: int | None = None) -> None:
        super().__init__()
        n_kv_head = check_heads(d_model, n_head, n_kv_head)
        require(window is None or window >= 1, f"window must be >= 1, got {window}; set model.window")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.rope_theta, self.window, self.dropout, self.max_len = rope_theta, window, dropout, max_len
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.add_output(d_model, d_model, dropout, bias)

    def forward(self, x: Tensor, step: Step, state: KVState | RingKVState | None = None) -> Tensor:
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D)  # [B, T, heads, D]
        qk, v = qkv[:, :, :H + Hkv], qkv[:, :, H + Hkv:]
        if self.rope_theta is not None:  # queries and keys in one pass; keys are cached already rotated
            cos, sin = step.rope(D, self.rope_theta)
            qk = apply_rope(qk, cos[:, None], sin[:, None])
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # [B, H, T, D], [B, Hkv, T, D]
        v = v.transpose(1, 2)  # [B, Hkv, T, D]
        if state is not None:
            k, v = state.update(k, v, step.start)
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache keeps the parameter dtype under autocast
        dropout = self.dropout if self.training else 0.0
        if self.window is None:
            y = attend(q, k, v, dropout)
        else:
            y = sliding_window_attention(q, k, v, self.window, dropout)
        return self.out(y)  # [B, H, T, D] -> [B, T, C]

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> KVState | RingKVState:
        args = (batch_size, self.n_kv_head, self.head_dim, device, dtype)
        return KVState(*args, limit=self.max_len) if self.window is None else RingKVState(self.window, *args)

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        """Bytes allocated after `seq_len` tokens: a ring holds min(seq_len, window) positions; a full cache
        its capacity, `reserved_positions(seq_len)` (a power of two up to max_len: at most 2x the
        positions' own bytes)."""
        positions = reserved_positions(seq_len, self.max_len) if self.window is None else min(seq_len, self.window)
        return 2 * self.n_kv_head * self.head_dim * positions * dtype.itemsize
