"""Trained-like weights for decoding tests.

At init every gate, merge weight and pooling score sits near its neutral value (sigmoid(0) = 0.5, a
uniform softmax, a zero pooling vector: a mean), and the residual branches are small, so a wrong
index or a wrong weight in a decoding path moves the logits by less than any tolerance. Re-drawing
every parameter at a scale where those are far from neutral makes such bugs visible.
"""

from __future__ import annotations

import torch
from torch import nn


def randomise(model: nn.Module, seed: int = 0, gain: float = 2.0) -> nn.Module:
    """Re-draw every parameter in place (float64 is left to the caller):

    - embeddings: N(0, 1) per entry;
    - matrices and other tensors of dim >= 2: N(0, gain / sqrt(fan_in)), fan_in = prod(shape[1:]),
      so pre-activations are O(gain): sigmoids, softmaxes and merge weights spread over their range;
    - norm gains (the weight of a module with `eps`, i.e. RMSNorm/LayerNorm): uniform in [0.3, 2];
    - every other vector (biases, pooling vectors, initial states): N(0, 1).
    Frozen buffers (e.g. efficientlm's external table) are kept."""
    gen = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules()
             if hasattr(m, "eps") and isinstance(getattr(m, "weight", None), torch.Tensor)}
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():
            if id(p) in norms:
                new = 0.3 + 1.7 * torch.rand(p.shape, generator=gen, dtype=torch.float64)
            elif id(p) in tables:
                new = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            elif p.dim() >= 2:
                new = torch.randn(p.shape, generator=gen, dtype=torch.float64) * gain / p[0].numel() ** 0.5
            else:
                new = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(new.to(p.dtype))
    return model


def saved_for_backward(fn, *args) -> list[torch.Tensor]:
    """Run fn(*args) and return one tensor per storage autograd keeps for backward (what training holds
    between forward and backward); recomputed regions (torch.utils.checkpoint) show only their inputs."""
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return list(kept.values())


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def assert_same_forward_and_grads(module: nn.Module, new, reference, x: torch.Tensor, tol: float = 1e-10) -> None:
    """new(x) == reference(x), and so are the gradients of a random projection of the output with respect to
    x and every parameter of `module` (float64 inputs: tol is relative to the largest entry)."""
    def run(fn):
        module.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        out = fn(xi)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        (out * weight).sum().backward()
        return out.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}

    got, want = run(new), run(reference)
    assert got[2].keys() == want[2].keys(), "the same parameters get gradients"
    for name, a, b in [("output", got[0], want[0]), ("grad x", got[1], want[1]),
                       *((f"grad {n}", got[2][n], want[2][n]) for n in want[2])]:
        torch.testing.assert_close(a, b, atol=tol * max(b.abs().max().item(), 1.0), rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_cached_calls_equal(mixer: nn.Module, x: torch.Tensor, want: torch.Tensor, tol: float = 1e-10) -> None:
    """A mixer fed x in pieces through its state (all at once, one token then the rest, a split mid-way)
    gives `want`, the whole-sequence output."""
    from efficia.models.decoder import Step
    T = x.shape[1]
    with torch.no_grad():
        for cuts in ([0, T], [0, 1, T], [0, T // 2, T // 2 + 1, T]):
            state = mixer.new_state(x.shape[0], x.device, x.dtype)
            got = torch.cat([mixer(x[:, a:b], Step(a, b - a, x.device), state)
                             for a, b in zip(cuts, cuts[1:], strict=False) if b > a], dim=1)
            torch.testing.assert_close(got, want, atol=tol, rtol=0)
