"""Name -> architecture class. Model files register themselves; the framework never special-cases one."""

from __future__ import annotations

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


def build_model(model_cfg: Mapping[str, Any], vocab_size: int):
    """Build the architecture named by `model_cfg['name']` from the rest of the model config."""
    params = dict(model_cfg)
    name = params.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](vocab_size=vocab_size, **params)
    except TypeError as err:  # a missing or unknown size name in the yaml
        raise ConfigError(f"model={name}: {err}. Check conf/model/{name}.yaml and the scale override.") from err
