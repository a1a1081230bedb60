"""Building blocks shared by every architecture, written once: norms, rotary positions, feed-forwards,
causal masks, the pre-norm residual block and GPT-2 initialisation.

The model contract and the decoder skeleton live in `decoder.py`; attention mixers in `attention.py`.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from efficia.errors import ConfigError


def require(condition: bool, message: str) -> None:
    """Constructor checks: a bad model setting is one clear line (ConfigError), not a deep traceback."""
    if not condition:
        raise ConfigError(message)


def check_heads(d_model: int, n_head: int, n_kv_head: int | None = None) -> int:
    """Validate a head layout (the one divisibility check every mixer uses); returns the number of K/V heads
    (null n_kv_head = one per query head)."""
    n_kv_head = n_kv_head or n_head
    require(n_head >= 1 and d_model % n_head == 0,
            f"d_model ({d_model}) must be divisible by n_head ({n_head}); change model.n_head or model.d_model")
    require(1 <= n_kv_head <= n_head and n_head % n_kv_head == 0,
            f"n_kv_head ({n_kv_head}) must divide n_head ({n_head}); set model.n_kv_head=null for MHA")
    return n_kv_head


# The marks a module carries for code that walks a model, set and read only through these functions:
#   residual   init_weights scales the std by 1/sqrt(2·n_layer) (it writes into the residual stream)
#   keep_init  init_weights leaves it alone (the module has its own init convention)
#   keep_float efficia.quantize leaves it in float (a model reads its weight as a matrix)
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def mark_residual(linear: ModuleT, residual: bool = True) -> ModuleT:
    linear.efficia_residual = residual
    return linear


def mark_keep_init(module: ModuleT) -> ModuleT:
    module.efficia_keep_init = True
    return module


def mark_keep_float(linear: ModuleT) -> ModuleT:
    linear.efficia_keep_float = True
    return linear


def is_residual(module: nn.Module) -> bool:
    return module.__dict__.get("efficia_residual", False)


def keeps_init(module: nn.Module) -> bool:
    return module.__dict__.get("efficia_keep_init", False)


def keeps_float(module: nn.Module) -> bool:
    return module.__dict__.get("efficia_keep_float", False)


class KeepsPreviousNames(nn.Module):
    """A module whose parameters had other names before (`previous_names`: previous -> current, relative to the
    module): state dicts that use them still load, through `load_state_dict` (checkpoints: the hook below) and
    through `current_names` (exports, which copy tensors by name): both rename with `rename_previous`."""

    previous_names: dict[str, str] = {}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        rename_previous(state_dict, prefix, self.previous_names)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def rename_previous(state_dict: dict, prefix: str, renamed: dict[str, str]) -> None:
    """Move the tensors of the module at `prefix` saved under previous names to their current ones, in place."""
    for old, new in renamed.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def current_names(net: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy of a whole model's tensors with every `KeepsPreviousNames` module's previous names made current (the
    renaming load_state_dict applies, for code that matches names itself)."""
    tensors = dict(tensors)
    for name, module in net.named_modules():  # parents first, as load_state_dict visits them
        if isinstance(module, KeepsPreviousNames):
            rename_previous(tensors, f"{name}." if name else "", module.previous_names)
    return tensors


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout, except that on a CPU the mask comes from comparing uniform draws with p: torch's CPU
    bernoulli_ makes dropout about 2x slower (forward+backward on [16, 6, 256, 256]: 75 vs 36 ms), and at
    nanoGPT's dropout 0.2 it was 18% of a 6-layer/384-wide training step."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    return x * ((torch.rand_like(x) >= p) * (1.0 / (1.0 - p)))


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` (the fast CPU mask); every model uses this one."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def expand_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Repeat each of Hkv K/V heads H/Hkv times for kernels without native grouped-query support."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, Tk, D]


class _RMSNorm(torch.autograd.Function):
    """F.rms_norm over the last dim (same dtypes: computed in float32 or wider, returned in x's dtype) that keeps
    x, in its own dtype, and rstd [..., 1] for backward; x·rstd is recomputed there."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # torch's opmath: bf16/fp16 upcast, fp64 kept
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, rstd, weight)
        y = xf * rstd
        y = y.mul_(weight) if torch.promote_types(y.dtype, weight.dtype) == y.dtype else y * weight
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        x_hat = x.to(rstd.dtype) * rstd  # recomputed
        g = grad.to(rstd.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g_hat = g * weight  # d loss / d x_hat
            dot = (g_hat * x_hat).mean(-1, keepdim=True)
            grad_x = g_hat.sub_(x_hat.mul_(dot)).mul_(rstd).to(x.dtype)  # rstd·(g_hat - x_hat·mean(g_hat·x_hat))
        return grad_x, grad_w, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """F.rms_norm(x, (D,), weight, eps) that keeps for backward only x and rstd [..., 1]. On the CPU torch
    decomposes rms_norm and keeps its fp32 input and x·rstd as well (twice the norm's activations: at T=8192
    optimus kept 72 MiB in RMSNorms against gpt's 36 in LayerNorms); on CUDA, F.rms_norm is a fused kernel that
    keeps input and rstd when the dtypes agree (autocast runs rms_norm in fp32 there), so it is used as is."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    if x.device.type == "cuda" and (x.dtype == weight.dtype or autocasting(x)):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm: no mean subtraction, no bias (cheaper than LayerNorm); `rms_norm` keeps half of
    what F.rms_norm keeps for backward on the CPU."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(dim: int, theta: float, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin [length, dim/2] for absolute positions start .. start+length-1 (decoding never restarts
    at 0, and positions beyond any training length are defined)."""
    if dim % 2:
        raise ConfigError(f"RoPE needs an even rotary dimension, got {dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # [T, D/2]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the last dim of x by tables that broadcast to x[..., D/2]:
    [T, D/2] for x[..., T, D], [T, 1, D/2] for x[B, T, heads, D]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


class MLP(nn.Module):
    """GPT-2 feed-forward: proj(gelu(fc(x)))."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = mark_residual(nn.Linear(hidden, dim, bias=bias))
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class GatedFeedForward(nn.Module):
    """GLU feed-forward: down(act(gate(x)) * up(x)). SwiGLU with SiLU, GeGLU with GELU."""

    def __init__(self, dim: int, hidden: int, activation: str = "silu", bias: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.act = {"silu": F.silu, "gelu": F.gelu}[activation]
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = mark_residual(nn.Linear(hidden, dim, bias=bias))
        self.dropout = Dropout(dropout)

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


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """F.scaled_dot_product_attention, except that on a CPU values narrower than the keys (MLA's decoupled RoPE
    key) are zero-padded to the key width: the fused CPU kernel needs one head size, and without it SDPA falls
    back to materialising [Tq, Tk] scores (optimus at T=8192: 6.5 GB). The padded columns are sliced off."""
    d_v, d_qk = v.shape[-1], q.shape[-1]
    if q.device.type == "cpu" and d_v < d_qk:
        return F.scaled_dot_product_attention(q, k, F.pad(v, (0, d_qk - d_v)), **kwargs)[..., :d_v]
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


SDPA_DROPOUT_ON_CPU = False  # efficia.plan sets it while it measures a GPU step on fake CPU tensors


def attend(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0, scale: float | None = None) -> Tensor:
    """Causal SDPA for q[B,H,Tq,D] against k,v[B,Hkv,Tk,D] where the queries are the last Tq keys.
    Hkv may divide H (grouped-query attention: SDPA shares each K/V head among H/Hkv query heads)."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    # SDPA's CPU kernels have no dropout: it would take its math path and the slow bernoulli_ mask
    if dropout > 0.0 and q.device.type == "cpu" and not SDPA_DROPOUT_ON_CPU:
        return attention_with_dropout(q, k, v, dropout, scale)
    gqa = k.shape[1] != q.shape[1]
    if q_len == k_len:
        return sdpa(q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
    if q_len == 1:  # one new token sees everything cached: no mask at all
        return sdpa(q, k, v, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    return sdpa(q, k, v, attn_mask=causal_mask(q_len, k_len, q.device), dropout_p=dropout, scale=scale,
                enable_gqa=gqa)


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


def autocasting(x: Tensor) -> bool:
    """Whether autocast is on for x's device (False where the device has none, e.g. meta): custom autograd
    functions that skip its casts step aside then."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


# activation -> (function, its backward given the output gradient and the input): what `gated_linear` recomputes
_ACTIVATIONS = {"gelu": (F.gelu, torch.ops.aten.gelu_backward), "silu": (F.silu, torch.ops.aten.silu_backward)}


class _GatedLinear(torch.autograd.Function):
    """F.linear(act(gate) * up, weight) keeping gate and up, not act(gate) or the product, for backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weight: Tensor, activation: str) -> Tensor:
        ctx.activation = activation
        ctx.save_for_backward(gate, up, weight)
        return F.linear(_ACTIVATIONS[activation][0](gate) * up, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        gate, up, weight = ctx.saved_tensors
        act, act_backward = _ACTIVATIONS[ctx.activation]
        a = act(gate)  # recomputed
        grad_w = grad.reshape(-1, grad.shape[-1]).T @ (a * up).reshape(-1, up.shape[-1])
        grad_hidden = grad @ weight
        grad_up = grad_hidden * a
        del a  # one hidden-wide temporary at a time: this runs while every earlier layer's tensors are kept
        return act_backward(grad_hidden.mul_(up), gate), grad_up, grad_w, None


def gated_linear(gate: Tensor, up: Tensor, linear: nn.Module, activation: str) -> Tensor:
    """linear(act(gate) * up), a gated feed-forward's output, keeping only gate and up for backward: autograd would
    also keep act(gate) and the product, `hidden` floats per token each, the largest tensors of a long-context
    pass. Costs one more activation and product in backward. Anything but a bias-free float nn.Linear under plain
    autograd (a quantized layer, autocast, no grad) takes the ordinary path."""
    plain = type(linear) is not nn.Linear or linear.bias is not None or not torch.is_grad_enabled()
    if plain or autocasting(gate):
        return linear(_ACTIVATIONS[activation][0](gate) * up)
    return _GatedLinear.apply(gate, up, linear.weight, activation)


class LeanGatedFeedForward(GatedFeedForward):
    """`GatedFeedForward` (same parameters, same results) that keeps gate(x) and up(x) for backward, not
    act(gate(x)) and the product as well: two hidden-wide activations per token instead of four
    (`gated_linear`)."""

    def __init__(self, dim: int, hidden: int, activation: str = "silu", bias: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__(dim, hidden, activation, bias, dropout)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(gated_linear(self.gate(x), self.up(x), self.down, self.activation))


def attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, p: float, scale: float | None = None) -> Tensor:
    """What SDPA's math path computes under dropout (causal, bottom-right aligned, GQA), with `dropout`'s mask."""
    k, v = expand_kv(q, k, v)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)  # [B, H, Tq, Tk]
    scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return dropout(scores.softmax(-1), p) @ v  # [B, H, Tq, D]


class PreNormBlock(nn.Module):
    """x + mixer(norm1(x)), then + ffn(norm2(x)): the residual block every decoder here uses.
    The mixer gets the call's `Step` and its own decoding state (None in training)."""

    def __init__(self, norm1: nn.Module, mixer: nn.Module, norm2: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.mixer, self.norm2, self.ffn = norm1, mixer, norm2, ffn

    def forward(self, x: Tensor, step, state=None) -> Tensor:
        x = x + self.mixer(self.norm1(x), step, state)
        return x + self.ffn(self.norm2(x))


def init_weights(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 init: N(0, std) for linears and embeddings, residual output projections (`mark_residual`) scaled by
    1/sqrt(2·n_layer) so the residual stream's variance does not grow with depth; modules with their own
    convention (`mark_keep_init`) are left alone."""
    for module in model.modules():
        if keeps_init(module):
            continue
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * n_layer) if is_residual(module) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
