"""Name -> architecture class. Model files register themselves; the framework never special-cases one."""

from __future__ import annotations

import inspect
import math
import types
import typing
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


def config_keys(cls: type) -> dict[str, inspect.Parameter]:
    """The constructor's keyword-only arguments that come from the yaml: all but vocab_size (from the tokenizer)
    and the tensors named in `cls.inputs` (given by the code that builds the model, never by the config)."""
    signature = inspect.signature(cls.__init__).parameters
    skip = {"vocab_size", *cls.inputs}
    return {k: p for k, p in signature.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in skip}


def check_model_keys(name: str, params: Mapping[str, Any]) -> None:
    """The yaml keys must be exactly the constructor's keyword arguments, each of its annotated type."""
    accepted = config_keys(MODELS[name])
    required = {k for k, p in accepted.items() if p.default is inspect.Parameter.empty}
    unknown, missing = sorted(set(params) - set(accepted)), sorted(required - set(params))
    if unknown or missing:
        parts = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + (
            [f"missing key(s) {', '.join(missing)}"] if missing else [])
        raise ConfigError(f"model={name}: {'; '.join(parts)}. It takes: {', '.join(sorted(accepted))}. "
                          f"Check conf/model/{name}.yaml and your overrides")
    hints = typing.get_type_hints(MODELS[name].__init__)
    for key, value in params.items():
        check_value(name, key, value, hints.get(key))


def check_value(name: str, key: str, value: Any, hint: Any) -> None:
    """One line for a value of the wrong kind (`model.n_head=x`), before any constructor does arithmetic with it.
    Every whole-number model key counts something (heads, widths, tokens, layers), so it must be >= 1."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) not in kinds:
            raise ConfigError(f"model={name}: {key} must be set, got null; set model.{key}")
        return
    kind = next((k for k in kinds if k is not type(None)), None)
    where = f"; set model.{key}"
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"model={name}: {key} must be a whole number, got {value!r}{where}")
        if value < 1:
            raise ConfigError(f"model={name}: {key} must be >= 1, got {value}{where}")
    elif kind is float:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"model={name}: {key} must be a number, got {value!r}{where}")
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"model={name}: {key} must be true or false, got {value!r}{where}")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"model={name}: {key} must be a string, got {value!r}{where}")
    elif typing.get_origin(kind) is dict and not isinstance(value, Mapping):
        raise ConfigError(f"model={name}: {key} must be a mapping of keys, got {value!r}{where}")


def construct(model_cfg: Mapping[str, Any], vocab_size: int, **inputs: Any) -> Any:
    """The architecture named by `model_cfg['name']`, built from the rest of the model config. `inputs`: the
    tensors the class declares in `inputs` (efficientlm's external table), read by the caller, never from files
    here. Call `efficia.build.build_model`, which reads them; only it and the remote-code bundle (no efficia
    installed there) call this."""
    params = dict(model_cfg)
    name = params.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    check_model_keys(name, params)
    return MODELS[name](vocab_size=vocab_size, **params, **inputs)
