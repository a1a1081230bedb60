"""`optimizer=muon`: torch.optim.Muon on the hidden weight matrices, AdamW on every other parameter, as ONE
optimizer (Lightning's automatic optimization steps one; the LR schedule scales every group of both).

Which matrices are hidden is each model's declaration (`muon_matrices` / `adamw_matrices` on its class,
efficia/models/decoder.py), never a guess from shapes: `split_for_muon` refuses a matrix declared nowhere.
Why each model's parameters go where they go: docs/muon.md.
"""

from __future__ import annotations

import re
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from efficia.errors import ConfigError


def matches(pattern: str, name: str) -> bool:
    """`*` stands for one part of a dotted parameter name (a block index, a module name), never several."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]+"), name) is not None


def split_for_muon(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names Muon trains, names AdamW trains) of the trainable parameters, each shared tensor once."""
    hidden, other = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hidden = any(matches(pattern, name) for pattern in model.muon_matrices)
        is_other = any(matches(pattern, name) for pattern in model.adamw_matrices)
        if p.dim() < 2 and not is_hidden:  # norms, gains, biases, initial states: AdamW's without declaring
            other.append(name)
        elif is_hidden == is_other or (is_hidden and p.dim() != 2):
            where = ("both muon_matrices and adamw_matrices" if is_hidden and is_other else
                     f"muon_matrices, but Muon takes 2-D matrices only (it is {p.dim()}-D)" if is_hidden else
                     "neither muon_matrices nor adamw_matrices")
            raise ConfigError(f"optimizer=muon: parameter {name} {tuple(p.shape)} of model {type(model).__name__} "
                              f"is in {where}; declare it in exactly one of them on the model class "
                              "(docs/muon.md says which goes where)")
        else:
            (hidden if is_hidden else other).append(name)
    return hidden, other


def plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments as plain types (Hydra hands lists and blocks over as OmegaConf objects), lists as tuples (AdamW's
    betas), so a checkpoint's param groups hold nothing but what torch.load(weights_only=True) reads."""
    values = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig | ListConfig) else v
              for k, v in cfg.items()}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


class JointState(ChainMap):
    """The inner optimizers' states read as one: a key is looked up, and written, in the state that holds it
    (ChainMap's own lookup would add an empty entry to each defaultdict it asks first)."""

    def owner(self, key: Any) -> dict:
        return next((state for state in self.maps if key in state), self.maps[0])

    def __getitem__(self, key: Any) -> Any:
        if not any(key in state for state in self.maps):
            raise KeyError(key)
        return self.owner(key)[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.owner(key)[key] = value


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over the param groups flagged `"muon": True`, torch.optim.AdamW over the others.

    `param_groups` are the two inner optimizers' own group dicts (so an LR scheduler, gradient clipping and
    GradScaler see and change them), `state` reads both, `step` steps both, and the state dict holds both."""

    splits_hidden_matrices = True  # TrainingModule.optimizer_and_schedule flags the hidden matrices' group

    def __init__(self, params: Iterable[Any], muon: Mapping[str, Any], foreach: bool | None = None,
                 **adamw: Any) -> None:
        """`muon`: torch.optim.Muon's arguments; the rest are torch.optim.AdamW's (conf/optimizer/muon.yaml).
        `foreach` is AdamW's too, named so that the memory plan can ask for CUDA's default implementation."""
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]  # plain tensors (a config check): AdamW's
        hidden = [{k: v for k, v in g.items() if k != "muon"} for g in groups if g.get("muon")]
        others = [g for g in groups if not g.get("muon")]
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if hidden:
            self.optimizers["muon"] = torch.optim.Muon(hidden, **plain(muon))
        if others:
            self.optimizers["adamw"] = torch.optim.AdamW(others, foreach=foreach, **plain(adamw))
        super().__init__([p for g in groups for p in g["params"]], {})
        self.link()

    def link(self) -> None:
        """Point `param_groups` and `state` at the inner optimizers' (again after loading replaced them)."""
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self.state = JointState(*(opt.state for opt in self.optimizers.values()))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:  # Lightning's: forward and backward of this step, run once
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ConfigError(f"optimizer=muon: the checkpoint's optimizer state holds {sorted(state_dict)}, this run "
                              f"builds {sorted(self.optimizers)}: resume with the optimizer the run was started with")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])
        self.link()
