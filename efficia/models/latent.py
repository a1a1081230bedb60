"""Latent attention pieces shared by MLA (`optimus`) and MTLA (`efficientlm`), written once.

DeepSeek-V2 multi-head latent attention keeps, per position, one low-rank latent and one small RoPE
key shared by every head instead of per-head keys and values:

    c_kv[B,S,d_c] = RMSNorm(x W_dkv)            the KV latent (the only content a cache keeps)
    k_R [B,S,d_R] = RoPE(x W_kr)                one rotated key shared across heads
    k_h = c_kv W_uk[h]   [B,S,D]                per-head content key   (W_uk [H, D, d_c])
    v_h = c_kv W_uv[h]   [B,S,Dv]               per-head value          (W_uv [H, Dv, d_c])
    score_h(t,s) = (q_c[h,t]·k_h[s] + q_R[h,t]·k_R[s]) · scale,   scale = 1/sqrt(D + d_R)

Two paths compute the same attention over ANY sequence of S latents (token-aligned for MLA,
temporally merged slots for MTLA) and take a boolean/additive mask or a causal flag:

- `LatentHeads.expanded`: materialise per-head K/V [B,H,S,·] and run multi-head SDPA (training:
  every matmul is large and parallel).
- `LatentHeads.absorbed`: fold W_uk into the query (q_c[h] W_uk[h] -> [B,H,T,d_c]), attend directly
  over [c_kv | k_R] (one key shared by all heads, so heads fold into the query axis: one SDPA head),
  then apply W_uv to the attended latent. Nothing per-head is ever built over S (decoding: the cache
  is only c_kv and k_R). The folded matrices are read from the CURRENT weights on every call, so
  they can never go stale after an optimizer step.

What a model calls (shapes, H heads, D = qk content head dim, Dv = value head dim):

    query = LatentQuery(d_model, n_head, D, d_rope, d_q)      # x -> q_c [B,H,T,D], q_R [B,H,T,d_R]
    kv = LatentKV(d_model, d_c, d_rope)                        # x -> c_kv [B,T,d_c], k_R [B,T,d_R]
    heads = LatentHeads(n_head, d_c, D, Dv)                    # W_uk, W_uv
    y = heads.attend(q_c, q_R, c_kv, k_R, absorbed=..., mask=... | is_causal=..., scale=None)  # [B,H,T,Dv]
    state = LatentState(...)                                   # a growing (c_kv, k_R) cache

RoPE: `LatentQuery`/`LatentKV` rotate q_R/k_R when given `rope=(cos, sin)` tables for their positions
(e.g. `Step.rope(d_rope, theta)`); pass None to rotate elsewhere. `d_rope=0` disables the decoupled
RoPE part (then q_R and k_R are None everywhere).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from efficia.models.construction import mark_keep_float, require
from efficia.models.kernels import attend, causal_mask, sdpa
from efficia.models.layers import RMSNorm, apply_rope

Rope = tuple[Tensor, Tensor] | None
T_out = TypeVar("T_out")


class LatentQuery(nn.Module):
    """Per-head queries: content part q_c and decoupled RoPE part q_R, through an optional low-rank
    query latent c_q = RMSNorm(x W_dq) of rank `d_q` (None: straight from x). W_uq and W_qr are one
    fused linear from the latent."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, d_rope: int, d_q: int | None,
                 bias: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        require(d_q is None or d_q >= 1, f"query latent rank must be >= 1 or null, got {d_q}")
        self.n_head, self.head_dim, self.d_rope = n_head, head_dim, d_rope
        self.down = nn.Linear(d_model, d_q, bias=bias) if d_q else None
        self.norm = RMSNorm(d_q, eps=norm_eps) if d_q else None
        self.up = nn.Linear(d_q or d_model, n_head * (head_dim + d_rope), bias=bias)

    def forward(self, x: Tensor, rope: Rope = None) -> tuple[Tensor, Tensor | None]:
        B, T, _ = x.shape
        H, D, R = self.n_head, self.head_dim, self.d_rope
        latent = self.norm(self.down(x)) if self.down is not None else x  # [B, T, d_q]
        q = self.up(latent).view(B, T, H, D + R).transpose(1, 2)  # [B, H, T, D + d_R]
        q_c, q_r = q.split((D, R), dim=-1)  # [B, H, T, D], [B, H, T, d_R]
        if R == 0:
            return q_c, None
        if rope is not None:
            q_r = apply_rope(q_r, *rope)
        return q_c, q_r


class LatentKV(nn.Module):
    """x -> (c_kv = norm(x W_dkv) [B,T,d_c], k_R = x W_kr [B,T,d_R], rotated if `rope` is given).
    W_dkv and W_kr are one fused linear. These two are all a latent cache ever needs to hold.
    `norm`: "rmsnorm" (DeepSeek-V2's, ours by default) or "layernorm" (with bias, as the MTLA authors' code)."""

    def __init__(self, d_model: int, d_c: int, d_rope: int, bias: bool = False, norm_eps: float = 1e-6,
                 norm: str = "rmsnorm") -> None:
        super().__init__()
        require(d_c >= 1, f"KV latent rank must be >= 1, got {d_c}")
        require(d_rope >= 0 and d_rope % 2 == 0, f"decoupled RoPE width must be even and >= 0, got {d_rope}")
        require(norm in ("rmsnorm", "layernorm"), f"latent_norm must be 'rmsnorm' or 'layernorm', got {norm!r}")
        self.d_c, self.d_rope = d_c, d_rope
        self.down = nn.Linear(d_model, d_c + d_rope, bias=bias)
        self.norm = RMSNorm(d_c, eps=norm_eps) if norm == "rmsnorm" else nn.LayerNorm(d_c, eps=norm_eps)

    def forward(self, x: Tensor, rope: Rope = None) -> tuple[Tensor, Tensor | None]:
        c_kv, k_r = self.down(x).split((self.d_c, self.d_rope), dim=-1)  # [B, T, d_c], [B, T, d_R]
        c_kv = self.norm(c_kv)
        if self.d_rope == 0:
            return c_kv, None
        if rope is not None:
            k_r = apply_rope(k_r, *rope)
        return c_kv, k_r


class LatentHeads(nn.Module):
    """The per-head up-projections W_uk [H, D, d_c] and W_uv [H, Dv, d_c] (stored as nn.Linear weights
    [H·D, d_c] and [H·Dv, d_c], so the usual init applies) and the two equivalent attention paths."""

    def __init__(self, n_head: int, d_c: int, head_dim: int, v_head_dim: int | None = None, bias: bool = False) -> None:
        super().__init__()
        require(not bias, "latent up-projections take no bias (a bias on keys/values cannot be absorbed)")
        self.n_head, self.d_c, self.head_dim = n_head, d_c, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.uk = nn.Linear(d_c, n_head * head_dim, bias=False)  # W_uk
        self.uv = nn.Linear(d_c, n_head * self.v_head_dim, bias=False)  # W_uv
        mark_keep_float(self.uk), mark_keep_float(self.uv)  # absorbed decoding reads them as matrices (quantize)

    # --- path 1: expanded per-head K/V, multi-head SDPA ----------------------------------------------

    def expand(self, c_kv: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head content keys [B,H,S,D] and values [B,H,S,Dv] from latents c_kv[B,S,d_c]."""
        B, S, _ = c_kv.shape
        k = self.uk(c_kv).view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        return k, self.values(c_kv)

    def values(self, c_kv: Tensor) -> Tensor:
        """Per-head values [B,H,S,Dv] from latents c_kv[B,S,d_c]."""
        B, S, _ = c_kv.shape
        return self.uv(c_kv).view(B, S, self.n_head, self.v_head_dim).transpose(1, 2)  # [B, H, S, Dv]

    def expanded_qkv(self, q_c: Tensor, q_r: Tensor | None, c_kv: Tensor,
                     k_r: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The per-head SDPA inputs: q = [q_c | q_R] [B,H,T,D+d_R], k = [k_h | k_R] [B,H,S,D+d_R] (the shared
        RoPE key repeated per head) and v [B,H,S,Dv]."""
        k, v = self.expand(c_kv)  # [B, H, S, D], [B, H, S, Dv]
        if q_r is None:
            return q_c, k, v
        B, H, S = k.shape[0], k.shape[1], k.shape[2]
        q = torch.cat((q_c, q_r), dim=-1)  # [B, H, T, D + d_R]
        k = torch.cat((k, k_r.unsqueeze(1).expand(B, H, S, k_r.shape[-1])), dim=-1)  # [B, H, S, D + d_R]
        return q, k, v

    def expanded(self, q_c: Tensor, q_r: Tensor | None, c_kv: Tensor, k_r: Tensor | None, *,
                 mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None,
                 dropout: float = 0.0) -> Tensor:
        """Attention output [B,H,T,Dv] with K/V materialised per head (see `attend` for arguments)."""
        scale = _scale(q_c, q_r, scale)
        q, k, v = self.expanded_qkv(q_c, q_r, c_kv, k_r)
        if mask is None and is_causal:
            return attend(q, k, v, dropout, scale=scale)  # bottom-right aligned causal SDPA
        return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)

    # --- path 2: absorbed weights over the latents -----------------------------------------------------

    def absorb_query(self, q_c: Tensor) -> Tensor:
        """q_c[B,H,T,D] -> q_c[h] W_uk[h] [B,H,T,d_c]: scores against the latents equal scores against
        the expanded keys, since q·(c W_uk^T) = (q W_uk)·c. From the current weight at every call."""
        w_uk = self.uk.weight.view(self.n_head, self.head_dim, self.d_c)  # [H, D, d_c]
        return q_c @ w_uk.to(q_c.dtype)  # [B, H, T, d_c]

    def absorb_output(self, o_latent: Tensor) -> Tensor:
        """Attended latents [B,H,T,d_c] -> per-head values [B,H,T,Dv] through W_uv[h] (current weight)."""
        w_uv = self.uv.weight.view(self.n_head, self.v_head_dim, self.d_c)  # [H, Dv, d_c]
        return o_latent @ w_uv.transpose(1, 2).to(o_latent.dtype)  # [B, H, T, Dv]

    def absorbed(self, q_c: Tensor, q_r: Tensor | None, c_kv: Tensor, k_r: Tensor | None, *,
                 mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None,
                 dropout: float = 0.0) -> Tensor:
        """Attention output [B,H,T,Dv] without per-head K/V: one key [c_kv | k_R] shared by all heads, so
        the H·T absorbed queries attend as one SDPA head over S latents (no head copies of the keys)."""
        scale = _scale(q_c, q_r, scale)
        B, H, T, _ = q_c.shape
        S = c_kv.shape[1]
        q = self.absorb_query(q_c)  # [B, H, T, d_c]
        c_kv = c_kv.to(q.dtype)  # a cache keeps the parameter dtype under autocast
        k = c_kv
        if q_r is not None:
            q = torch.cat((q, q_r), dim=-1)  # [B, H, T, d_c + d_R]
            k = torch.cat((c_kv, k_r.to(q.dtype)), dim=-1)  # [B, S, d_c + d_R]
        if mask is None and is_causal and T > 1:
            mask = causal_mask(T, S, q.device)  # bottom-right aligned (a single query sees everything)
        if mask is not None:
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
            mask = mask.expand(mask.shape[0], H, T, S).reshape(mask.shape[0], 1, H * T, S)  # [B|1, 1, H·T, S]
        q = q.reshape(B, 1, H * T, q.shape[-1])  # [B, 1, H·T, d_c + d_R]: heads fold into the query axis
        o = sdpa(q, k.unsqueeze(1), c_kv.unsqueeze(1), attn_mask=mask,
                 dropout_p=dropout, scale=scale)  # [B, 1, H·T, d_c]
        return self.absorb_output(o.view(B, H, T, self.d_c))  # [B, H, T, Dv]

    def attend(self, q_c: Tensor, q_r: Tensor | None, c_kv: Tensor, k_r: Tensor | None, *, absorbed: bool,
               mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None,
               dropout: float = 0.0) -> Tensor:
        """Multi-head attention of queries q_c[B,H,T,D] (+ q_R[B,H,T,d_R]) over S latents c_kv[B,S,d_c]
        (+ shared k_R[B,S,d_R]) -> [B,H,T,Dv]. Both paths give the same result.

        mask: boolean (True = may attend) or additive float, broadcastable to [B,H,T,S]; or
        is_causal: the T queries are the last T of the S positions (bottom-right aligned).
        scale: None = 1/sqrt(D + d_R) (the width of the full per-head query, not of the latent).
        """
        require(mask is None or not is_causal, "give either a mask or is_causal, not both")
        path = self.absorbed if absorbed else self.expanded
        return path(q_c, q_r, c_kv, k_r, mask=mask, is_causal=is_causal, scale=scale, dropout=dropout)


def recompute_in_backward(fn: Callable[..., T_out], *args: Any) -> T_out:
    """fn(*args), keeping for backward only what fn's outputs' consumers keep, plus args: everything fn
    computed in between is recomputed in backward (non-reentrant `checkpoint`; exact, the same ops again).

    Why: the latent projections are cheap (O(T·d·d_c)) next to attention (O(T²)), but autograd would keep each
    of their [T, ·] intermediates (the latent before and after its norm, the query latent, the per-head
    keys and the [q_c | q_R] / [k_h | k_R] concatenations) per layer: at T = 8192, scale=small, about 12 MiB
    (optimus) and 23 MiB (efficientlm) a layer, and the [B,T,H·Dv] copy the output projection keeps (4 MiB)
    when its input is SDPA's output, which SDPA keeps anyway. Under no_grad (decoding) fn just runs."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def _scale(q_c: Tensor, q_r: Tensor | None, scale: float | None) -> float:
    if scale is not None:
        return scale
    return 1.0 / math.sqrt(q_c.shape[-1] + (q_r.shape[-1] if q_r is not None else 0))


class LatentState:
    """A latent decoding cache: c_kv [B,S,d_c] and k_R [B,S,d_R] of every position so far, grown by each
    call (never padded), so it holds exactly (d_c + d_R) numbers per position."""

    def __init__(self, batch_size: int, d_c: int, d_rope: int, device: torch.device, dtype: torch.dtype) -> None:
        self.c_kv = torch.zeros(batch_size, 0, d_c, device=device, dtype=dtype)
        self.k_r = torch.zeros(batch_size, 0, d_rope, device=device, dtype=dtype) if d_rope else None

    def update(self, c_kv: Tensor, k_r: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Append c_kv[B,T,d_c] and k_R[B,T,d_R] and return every latent so far (in the cache dtype)."""
        self.c_kv = torch.cat((self.c_kv, c_kv.to(self.c_kv.dtype)), dim=1)
        if self.k_r is not None:
            self.k_r = torch.cat((self.k_r, k_r.to(self.k_r.dtype)), dim=1)
        return self.c_kv, self.k_r

    @staticmethod
    def nbytes(seq_len: int, d_c: int, d_rope: int, dtype: torch.dtype) -> int:
        """Bytes held for one sequence after `seq_len` positions."""
        return seq_len * (d_c + d_rope) * dtype.itemsize
