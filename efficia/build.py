"""The one model factory: a model config and a vocabulary size become a model, everywhere (training, loading,
export, the GPU plan, FLOPs counting), with the tensors some models take from outside their config
(efficientlm's frozen external table). It also holds the safe checkpoint reader that the table, resuming and
loading share: `torch.load(weights_only=True)`, so no code in a checkpoint ever runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from efficia.errors import CheckpointError, ConfigError
from efficia.models import MODELS, LanguageModel
from efficia.models.registry import construct


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path train.py printed "
                              "(e.g. outputs/<date>/<time>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse an untrusted file means "not a checkpoint"
        reason = str(err).splitlines()[0].split(".")[0][:100] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupted or not a torch "
                              f"file: {reason}); use a complete .ckpt written by train.py") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "cfg" not in hparams or "tokenizer_state" not in hparams:
        raise CheckpointError(f"{path} is a torch file but not an efficia checkpoint (no run config "
                              "inside); use a .ckpt written by efficia's train.py")
    return ckpt


def load_external_table(source: str, key: str | None, vocab_size: int) -> torch.Tensor:
    """A frozen per-token table [vocab, d_ext]: the token embeddings of another efficia checkpoint (.ckpt) or a
    matrix in a .safetensors file (`key` names it when the file holds several). Rows are token ids."""
    path = Path(source).expanduser()
    hint = "set model.external.source to an efficia .ckpt or a .safetensors matrix, or null for no adapter"
    if not path.is_file():
        raise ConfigError(f"efficientlm: external embedding source {path} does not exist; {hint}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if key is None and len(tensors) != 1:
            raise ConfigError(f"efficientlm: {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); "
                              "name one with model.external.key")
        table = tensors[key] if key is not None else next(iter(tensors.values()))
    else:
        weights = read_checkpoint(path)["state_dict"]
        name = key or "net.tok_emb.weight"
        if name not in weights:
            raise ConfigError(f"efficientlm: checkpoint {path} has no tensor {name!r}; name one with "
                              "model.external.key")
        table = weights[name]
    if table.dim() != 2 or table.shape[0] != vocab_size:
        raise ConfigError(f"efficientlm: external table in {path} has shape {tuple(table.shape)}, expected "
                          f"[{vocab_size}, d] (one row per token id of this tokenizer); use a table made with "
                          "the same tokenizer")
    return table.detach().float()


def model_inputs(model_cfg: Mapping[str, Any], vocab_size: int,
                 weights: Mapping[str, torch.Tensor | Sequence[int]] | None = None) -> dict[str, torch.Tensor | None]:
    """The tensors a model takes besides its config (the names in its class's `inputs`): efficientlm's frozen
    external table. `weights` (name -> tensor or shape) are the weights about to be loaded: a checkpoint or an
    export holds the table, so then only its shape is needed (a placeholder the load fills) and the source file
    may be gone. Otherwise the table is read from `model.external.source`."""
    cls = MODELS.get(model_cfg.get("name"))
    external = model_cfg.get("external")
    if cls is None or "external_table" not in cls.inputs or not isinstance(external, Mapping):
        return {}  # construct refuses a bad model config in one line
    if external.get("source") is None:
        return {"external_table": None}
    if weights is not None and "external_table" in weights:
        saved = weights["external_table"]
        return {"external_table": torch.zeros(tuple(saved.shape if isinstance(saved, torch.Tensor) else saved))}
    return {"external_table": load_external_table(str(external["source"]), external.get("key"), vocab_size)}


def weights_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype of a checkpoint's or an export's floating weights, the one a loaded model keeps (bf16 stays bf16);
    fp32 when they are mixed."""
    floating = {d for d in dtypes if d.is_floating_point}
    return floating.pop() if len(floating) == 1 else torch.float32


def build_model(model_cfg: Mapping[str, Any], vocab_size: int,
                weights: Mapping[str, torch.Tensor | Sequence[int]] | None = None,
                device: str | torch.device | None = None) -> LanguageModel:
    """The model a config describes, with the tensors it takes from outside (see `model_inputs`). `device`:
    where to build it; "meta" builds it without memory (FLOPs counting, the GPU plan)."""
    inputs = model_inputs(model_cfg, vocab_size, weights)
    if device is None:
        return construct(model_cfg, vocab_size, **inputs)
    inputs = {k: None if v is None else v.to(device) for k, v in inputs.items()}
    with torch.device(device):
        return construct(model_cfg, vocab_size, **inputs)
