"""The output layer and its loss as one unit: hidden[N, C] @ weight[V, C].T -> cross-entropy with targets[N].

The plain path materialises logits[N, V] (with GPT-2's 50,257 tokens and a 24 x 64 batch: 309 MB in fp32, plus
its log-softmax and its gradient, allocated and zeroed on every step). The fused path never does: it walks the
rows in chunks of `chunk_size` tokens, computing each chunk's logits into one reused buffer, its softmax in
place, the chunk's losses and, when a gradient is wanted, its gradient w.r.t. hidden and weight right away
(Liger-Kernel's FusedLinearCrossEntropy design), so backward only scales what forward left. For
`reduction="none"` with a gradient (a per-token weight unknown at forward time) backward recomputes per chunk.

    grad_logits = (softmax(z) - onehot(t)) * row_weight    row_weight = 1/n_valid (mean), 1 (sum), g_i (none)
    grad_hidden = grad_logits @ weight                     grad_weight = grad_logits.T @ hidden

Targets equal to `ignore_index` contribute no loss and no gradient, and "mean" divides by the number of the
others, exactly as `F.cross_entropy(ignore_index=...)` does. Under autocast the two matmuls run in the autocast
dtype; softmax, losses and the weight gradient's accumulation stay in fp32. On a CUDA device, when
`cut-cross-entropy` is installed (`pip install .[gpu]`), its kernel does the same job instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from efficia.errors import ConfigError

IMPLS = ("fused", "plain")
TINY = 1e-30  # below this a softmax probability has lost its digits: that row's loss is taken from logsumexp


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, impl: str = "fused",
                         chunk_size: int = 256, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Cross-entropy of `hidden[..., C] @ weight[V, C].T` against `targets[...]`; "none" returns losses[N]
    (flattened, 0 where ignored). `impl`: "fused" (chunks of `chunk_size` rows, no [N, V] tensor) or "plain"
    (F.linear + F.cross_entropy). When all N rows fit in one chunk (a character vocabulary) the plain path runs:
    it holds the same logits and measures faster there (docs/bpe-speed.md)."""
    if impl not in IMPLS:
        raise ConfigError(f"loss.impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"loss.chunk_size must be a positive number of tokens, got {chunk_size!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if impl == "fused" and not is_fake(targets):
        scored = targets != ignore_index
        kept = int(scored.sum())
        if 0 < kept < targets.numel():  # only scored rows get logits (MQAR: 8 answers in 64): the rest cost nothing
            rows = scored.nonzero().squeeze(1)
            losses = linear_cross_entropy(hidden.index_select(0, rows), weight, targets.index_select(0, rows),
                                          impl=impl, chunk_size=chunk_size, ignore_index=ignore_index,
                                          reduction=reduction)
            return losses if reduction != "none" else losses.new_zeros(targets.numel()).index_copy(0, rows, losses)
    if impl == "plain" or hidden.shape[0] <= chunk_size:  # one chunk holds every logit: plain is that, with fewer ops
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index,
                               reduction=reduction)
    if hidden.is_cuda and cut_cross_entropy() is not None:
        return cut_cross_entropy()(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction)
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    return FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, reduction, dtype)


def cut_cross_entropy():
    """Apple's `cut_cross_entropy.linear_cross_entropy` when it imports (a CUDA build with Triton), else None."""
    global _CCE
    if _CCE is False:
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except Exception:  # not installed, or no Triton/CUDA build: ours runs instead
            cce = None
        _CCE = cce
    return _CCE


_CCE = False


def chunk_losses(logits: Tensor, targets: Tensor, valid: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """Losses of one chunk; `logits` (fp32, [c, V]) is turned into its softmax in place."""
    safe = torch.where(valid, targets, 0)[:, None]  # [c, 1]
    torch.ops.aten._softmax.out(logits, -1, False, out=logits)  # in place: one buffer per chunk, not two
    p = logits.gather(1, safe).squeeze(1)  # [c]
    losses = -p.log()
    tiny = (p < TINY) & valid
    if not is_fake(p) and bool(tiny.any()):  # rare: recompute those rows' logits exactly (logsumexp - z_t)
        z = (h[tiny] @ w.T).float()  # [k, V]
        losses[tiny] = z.logsumexp(-1) - z.gather(1, safe[tiny]).squeeze(1)
    return losses.masked_fill_(~valid, 0.0)


def chunk_grads(probs: Tensor, targets: Tensor, row_weight: Tensor, h: Tensor, w: Tensor,
                grad_h: Tensor, grad_w: Tensor, first: bool) -> None:
    """From a chunk's softmax: grad_h[c, C] = row_weight * (p - y) @ w; grad_w[V, C] += (p - y).T @ (row_weight * h).
    The row weights (0 on ignored rows) scale the small [c, C] sides, never the [c, V] one."""
    valid = row_weight != 0
    probs.scatter_add_(1, torch.where(valid, targets, 0)[:, None], -valid[:, None].to(probs.dtype))  # p - y
    g = probs.to(w.dtype)
    torch.mm(g, w, out=grad_h)
    grad_h.mul_(row_weight[:, None])
    hw = h * row_weight[:, None].to(h.dtype)
    if grad_w.dtype == g.dtype:  # the first chunk writes grad_w (no zero-fill of [V, C]), the others add
        torch.mm(g.T, hw, out=grad_w) if first else grad_w.addmm_(g.T, hw)
    else:  # autocast: a low-precision product, accumulated in fp32
        grad_w.copy_(g.T @ hw) if first else grad_w.add_(g.T @ hw)


def chunked_pass(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int,
                 dtype: torch.dtype, row_weight: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One walk over the rows: per-token losses [N] (fp32) and, with `row_weight`, the gradients
    (grad_hidden [N, C] in `dtype`, grad_weight [V, C] in fp32)."""
    N, V = hidden.shape[0], weight.shape[0]
    w = weight.to(dtype)
    h_all = hidden.to(dtype)
    valid_all = targets != ignore_index
    losses = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty(N, hidden.shape[1], dtype=dtype, device=hidden.device) if row_weight is not None else None
    grad_w = torch.empty(V, weight.shape[1], dtype=torch.float32, device=hidden.device) \
        if row_weight is not None else None
    buffer = torch.empty(min(chunk_size, N), V, dtype=dtype, device=hidden.device)
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        h, t, valid = h_all[s:e], targets[s:e], valid_all[s:e]
        z = torch.mm(h, w.T, out=buffer[: e - s])  # [c, V] logits of this chunk only
        logits = z if dtype == torch.float32 else z.float()
        losses[s:e] = chunk_losses(logits, t, valid, h, w)
        if row_weight is not None:
            chunk_grads(logits, t, row_weight[s:e] * valid, h, w, grad_h[s:e], grad_w, first=s == 0)
    return losses, grad_h, grad_w


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Chunked linear + cross-entropy. Mean/sum: gradients made in forward, scaled in backward.
    None: forward keeps the inputs, backward recomputes each chunk with the per-token upstream weights."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int,
                reduction: str, dtype: torch.dtype) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            valid = targets != ignore_index
            n = valid.sum()
            row_weight = None
            if wants_grad and reduction != "none":
                scale = 1.0 / n.clamp(min=1) if reduction == "mean" else torch.ones((), device=hidden.device)
                row_weight = scale.float().expand(hidden.shape[0])
            losses, grad_h, grad_w = chunked_pass(hidden, weight, targets, chunk_size, ignore_index, dtype,
                                                  row_weight)
        ctx.reduction, ctx.chunk, ctx.ignore, ctx.dtype = reduction, chunk_size, ignore_index, dtype
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, targets)
            return losses
        ctx.save_for_backward(grad_h, grad_w)
        total = losses.sum()
        return total / n if reduction == "mean" else total  # mean of nothing is nan, as in F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.reduction == "none":
            hidden, weight, targets = ctx.saved_tensors
            with torch.autocast(hidden.device.type, enabled=False):
                _, grad_h, grad_w = chunked_pass(hidden, weight, targets, ctx.chunk, ctx.ignore, ctx.dtype,
                                                 grad_out.float())
        else:
            grad_h, grad_w = ctx.saved_tensors
            if is_fake(grad_out) or grad_out.item() != 1.0:  # loss.backward() needs no pass over the gradients
                grad_h, grad_w = grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.float()
        grad_h = grad_h.to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_w.to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None, None
