"""Name -> architecture class. Model files register themselves; the framework never special-cases one."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from efficia.errors import ConfigError

MODELS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        MODELS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def check_model_keys(name: str, params: Mapping[str, Any]) -> None:
    """The yaml keys must be exactly the constructor's keyword arguments (vocab_size comes from the tokenizer)."""
    signature = inspect.signature(MODELS[name].__init__).parameters
    accepted = {k for k, p in signature.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} - {"vocab_size"}
    required = {k for k in accepted if signature[k].default is inspect.Parameter.empty}
    unknown, missing = sorted(set(params) - accepted), sorted(required - set(params))
    if unknown or missing:
        parts = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + (
            [f"missing key(s) {', '.join(missing)}"] if missing else [])
        raise ConfigError(f"model={name}: {'; '.join(parts)}. It takes: {', '.join(sorted(accepted))}. "
                          f"Check conf/model/{name}.yaml and your overrides")


def build_model(model_cfg: Mapping[str, Any], vocab_size: int):
    """Build the architecture named by `model_cfg['name']` from the rest of the model config."""
    params = dict(model_cfg)
    name = params.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    check_model_keys(name, params)
    return MODELS[name](vocab_size=vocab_size, **params)
