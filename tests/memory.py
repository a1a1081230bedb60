"""What autograd keeps for backward: the check behind the long-context memory rewrites."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def saved_tensors(fn: Callable[..., Any], *args: Any) -> tuple[Any, list[tuple[tuple[int, ...], int]]]:
    """fn(*args) and, for every storage autograd keeps for its backward (each once), the shape of the first
    tensor saved from it and the storage's bytes."""
    seen: dict[int, tuple[tuple[int, ...], int]] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), (tuple(t.shape), storage.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, list(seen.values())
