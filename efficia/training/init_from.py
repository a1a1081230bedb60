"""`init_from=<source>`: a new run (step 0, a new optimizer and schedule, its own folder) that starts from trained
weights: an efficia .ckpt, an export folder (`save_pretrained`, either format) or a GPT-2 transformers folder.

The model config comes from the source; `model.<key>=` overrides on the command line apply on top (dropout,
gradient checkpointing), and one that would change a weight's shape is refused naming it. The run's tokenizer
(tokenizer= and data=) must be the source's. `train_only=[globs]` trains only the parameters whose names match
(e.g. the head and norms); the others keep the source's values.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from efficia.build import build_model
from efficia.data.tokenizers import Tokenizer
from efficia.errors import ConfigError
from efficia.inference.loading import LoadedModel


def command_line_overrides() -> list[str]:
    """The run's own `key=value` overrides (Hydra's task overrides), without +/++/~ prefixes; [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o.lstrip("+~") for o in HydraConfig.get().overrides.task]


def init_source(cfg: DictConfig) -> tuple[DictConfig, LoadedModel | None]:
    """The run config to train (its model config from `init_from`) and the source model, or (cfg, None)."""
    from efficia.inference.pretrained import load_any

    source = cfg.get("init_from")
    if not source:
        if cfg.get("train_only"):
            raise ConfigError("train_only= freezes the rest of a model started from trained weights; "
                              "give init_from=<checkpoint or folder> too")
        return cfg, None
    if not Path(str(source)).expanduser().exists():
        raise ConfigError(f"init_from={source} does not exist; give an efficia .ckpt, an export folder or a GPT-2 "
                          "transformers folder")
    model = load_any(str(source))
    return start_config(cfg, model), model


def change(model_cfg: dict[str, Any], source: LoadedModel) -> str | None:
    """What building `model_cfg` with the source's weights would change: their shapes, or what they compute (the
    eval-mode logits of a short input, e.g. model.n_head, which keeps every shape); None if neither."""
    weights = source.net.state_dict()
    vocab = source.tokenizer.vocab_size
    meta = build_model(model_cfg, vocab, weights, device="meta").state_dict()
    if {k: tuple(v.shape) for k, v in meta.items()} != {k: tuple(v.shape) for k, v in weights.items()}:
        return "changes its weights' shapes"
    net = build_model(model_cfg, vocab, weights)
    net.load_state_dict(weights)
    length = min(8, net.max_seq_len, source.net.max_seq_len)
    idx = torch.randint(vocab, (1, length), generator=torch.Generator().manual_seed(0), device=source.device)
    with torch.no_grad():
        ours, theirs = net.to(source.device).eval()(idx), source.net.eval()(idx)
    same = (ours - theirs).abs().max().item() <= 1e-6 * max(1.0, theirs.abs().max().item())  # same code: same math
    return None if same else "changes what its weights compute"


def start_config(cfg: DictConfig, source: LoadedModel) -> DictConfig:
    """`cfg` with its model config replaced by the source's, plus the command line's `model.<key>=` overrides;
    one line for an override that changes the architecture, a weight's shape or what the weights compute."""
    given = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in command_line_overrides() if "=" in o}
    there = dict(source.cfg["model"])
    where = f"init_from={cfg.init_from} holds a {there['name']} model"
    if "model" in given and given["model"] != there["name"]:
        raise ConfigError(f"{where}; drop model={given['model']} (the model comes from init_from)")
    keys = sorted({k.split(".")[1] for k in given if k.startswith("model.")})
    run_model = OmegaConf.to_container(cfg.model, resolve=True)
    model = {**there, **{k: run_model[k] for k in keys if k in run_model}}
    if keys and change(model, source):
        culprit = next((k for k in keys if change({**there, k: model[k]}, source)), "/".join(keys))
        what = change({**there, culprit: model.get(culprit)}, source) or change(model, source)
        raise ConfigError(f"{where}: model.{culprit}={model.get(culprit)!r} {what} (it has {culprit}="
                          f"{there.get(culprit)!r}); drop that override to start from its weights")
    cfg = copy.deepcopy(cfg)  # a shallow copy's nodes would still resolve ${model.*} against the original
    with open_dict(cfg):
        cfg.model = model
    return cfg


def check_tokenizer(source: LoadedModel, tokenizer: Tokenizer, init_from: str) -> None:
    if dict(source.tokenizer.state()) != dict(tokenizer.state()):
        raise ConfigError(f"init_from={init_from} was trained with tokenizer {source.tokenizer.name}, this run's "
                          f"tokenizer= and data give {tokenizer.name}; set the tokenizer (and data) it was trained "
                          "with")


def start_from(net: nn.Module, source: LoadedModel, train_only: Sequence[str] | None) -> None:
    """Copy the source's weights into `net`; with `train_only`, freeze every parameter none of whose names match."""
    net.load_state_dict(source.net.state_dict())
    if not train_only:
        return
    names: dict[int, list[str]] = {}
    for name, p in net.named_parameters(remove_duplicate=False):  # a tied head answers to both its names
        names.setdefault(id(p), []).append(name)
    matched = 0
    for p in net.parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(n, g) for n in names[id(p)] for g in train_only))
        matched += p.requires_grad
    if not matched:
        raise ConfigError(f"train_only={list(train_only)} matches no parameter; names look like "
                          f"{', '.join(list(dict(net.named_parameters()))[:4])}, ... (globs, e.g. '*norm*')")
