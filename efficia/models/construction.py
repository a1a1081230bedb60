"""How model modules are built and loaded, the same way in every architecture: constructor checks, the marks
that init and quantization read, GPT-2 initialisation, and loading state dicts saved under previous parameter
names.

Attention kernels live in `kernels.py`, layers (norms, RoPE, feed-forwards) in `layers.py`, the decoder
skeleton in `decoder.py`.
"""

from __future__ import annotations

import math
from typing import TypeVar

from torch import Tensor, nn

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
#   keep_float efficia.inference.quantize leaves it in float (a model reads its weight as a matrix)
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


class KeepsPreviousNames(nn.Module):
    """A module whose parameters are also known by other names (`previous_names`: previous -> current, relative
    to the module): state dicts that use them still load, through `load_state_dict` (checkpoints: the hook
    below) and through `current_names` (exports, which copy tensors by name): both rename with
    `rename_previous`."""

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
