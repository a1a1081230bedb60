"""Layers shared by every architecture, written once: dropout, RMSNorm, rotary positions, the feed-forwards
(GPT-2's MLP, SwiGLU/GeGLU and a lean variant) and the pre-norm residual block.

Attention kernels live in `kernels.py`, construction helpers (checks, init, marks) in `construction.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from efficia.errors import ConfigError
from efficia.models.construction import mark_residual


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout, except that on a CPU the mask comes from comparing uniform draws with p: torch's CPU
    bernoulli_ makes dropout about 2x slower (forward+backward on [16, 6, 256, 256]: 75 vs 36 ms), 18% of a
    6-layer/384-wide training step at nanoGPT's dropout 0.2."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    return x * ((torch.rand_like(x) >= p) * (1.0 / (1.0 - p)))


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` (the fast CPU mask); every model uses this one."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def autocasting(x: Tensor) -> bool:
    """Whether autocast is on for x's device (False where the device has none, e.g. meta): custom autograd
    functions that skip its casts step aside then."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


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
    optimus would keep 72 MiB in RMSNorms against gpt's 36 in LayerNorms); on CUDA, F.rms_norm is a fused kernel that
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
    """GPT-2 feed-forward: proj(gelu(fc(x))). `approximate="tanh"` is the GELU OpenAI's GPT-2 was trained with
    (transformers' gelu_new)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, bias: bool = False,
                 approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = mark_residual(nn.Linear(hidden, dim, bias=bias))
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


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


class PreNormBlock(nn.Module):
    """x + mixer(norm1(x)), then + ffn(norm2(x)): the residual block every decoder here uses.
    The mixer gets the call's `Step` and its own decoding state (None in training)."""

    def __init__(self, norm1: nn.Module, mixer: nn.Module, norm2: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.mixer, self.norm2, self.ffn = norm1, mixer, norm2, ffn

    def forward(self, x: Tensor, step, state=None) -> Tensor:
        x = x + self.mixer(self.norm1(x), step, state)
        return x + self.ffn(self.norm2(x))
