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
