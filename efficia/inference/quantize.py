"""int8 sampling on a CPU: every nn.Linear becomes a dynamically quantized one (int8 weights per output
channel, activations quantized per call, int8 GEMM), everything else stays float.

A Linear whose weight a model reads as a matrix (MLA's absorbed decoding multiplies by W_uk and W_uv) carries
`mark_keep_float` and is left alone, so every registered model decodes the same way quantized or not.
Built on `torch.ao.quantization.quantize_dynamic`, which torch 2.13 still ships (it warns that it is moving to
torchao); the warning is silenced here because the user asked for exactly this.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from efficia.errors import ConfigError
from efficia.models.construction import keeps_float

MODES = ("int8",)


def check_mode(mode: str | None, device: torch.device) -> None:
    if mode is None:
        return
    if mode not in MODES:
        raise ConfigError(f"quantize={mode!r}: give int8 (dynamic int8 Linear layers) or null")
    if device.type != "cpu":
        raise ConfigError(f"quantize={mode} runs on a CPU only (int8 GEMM kernels); drop quantize or use device=cpu")


def quantize_int8(net: nn.Module) -> nn.Module:
    """Replace the Linear layers of an eval-mode model in place; returns it."""
    names = {name for name, m in net.named_modules()
             if type(m) is nn.Linear and not keeps_float(m)}
    spec = {name: torch.ao.quantization.per_channel_dynamic_qconfig for name in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions", category=UserWarning)
        torch.ao.quantization.quantize_dynamic(net, spec, dtype=torch.qint8, inplace=True)
    return net
