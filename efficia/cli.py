"""What the commands share (train.py, sample.py, every `python -m efficia.<command>`): errors meant for a person
become one line, arguments are `key=value` overrides, nothing heavier is imported."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from efficia.errors import ConfigError, EfficiaError


def run_cli(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Errors meant for a person print as one line and exit 2 (a stop by signal: 128 + its number, as a shell
    reports it); anything else is a real bug and keeps its trace."""
    try:
        return fn(cfg)
    except EfficiaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))


def command_options(argv: Sequence[str], doc: str, options: Mapping[str, Any], required: Sequence[str] = (),
                    passthrough: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The arguments of a `python -m efficia.<command>`, in Hydra's style: `key=value`, values typed as in yaml
    (`true`, `0.3`, `null`). `options`: the command's own keys and their defaults; `required`: those that
    must be given. With `passthrough`, other `key=value` arguments are returned as train.py overrides;
    otherwise they are refused. `-h`/`--help` prints `doc` and exits 0."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(inspect.cleandoc(doc))
        sys.exit(0)
    usage = inspect.cleandoc(doc).splitlines()[0]
    chosen, rest = dict(options), []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" not in arg or arg.startswith("-") or not key:
            raise ConfigError(f"{arg!r} is not a key=value option; usage: {usage} (--help for more)")
        if key not in options:
            if passthrough:
                rest.append(arg)
                continue
            raise ConfigError(f"unknown option {key!r}; it takes {', '.join(options)}; usage: {usage}")
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([arg]))[key]
        except Exception:  # noqa: BLE001 - omegaconf's grammar errors come in several classes
            raise ConfigError(f"cannot read {arg!r}; quote a value with spaces (key='a b'); usage: {usage}") from None
        raw = arg.split("=", 1)[1]
        # as Hydra reads it: a list or mapping only in brackets (`table=-` is "-", not yaml's [None])
        chosen[key] = raw if isinstance(value, (list, dict)) and not raw.lstrip().startswith(("[", "{")) else value
    missing = [k for k in required if chosen.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"missing {' and '.join(f'{k}=' for k in missing)}; usage: {usage}")
    return chosen, rest
