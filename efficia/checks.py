"""Bad input becomes one line naming the key, the value and the fix, before anything deep can trace back.

`check_run_config` runs first in `train()`; `check_sampling` guards `sample.py` and `efficia.load(...).generate`;
`config_errors` turns what a library raises while building from config into the same kind of line.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

from efficia.errors import ConfigError, EfficiaError

NONFINITE_CHOICES = ("stop", "skip")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_run_config(cfg: Mapping[str, Any]) -> None:
    """What train.py reads itself (the libraries' own arguments are checked where they are built)."""
    seed = cfg.get("seed")
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r}: give a whole number between 0 and 2**32 - 1")
    if cfg.get("nonfinite_loss") not in NONFINITE_CHOICES:
        raise ConfigError(f"nonfinite_loss={cfg.get('nonfinite_loss')!r}: use one of {', '.join(NONFINITE_CHOICES)}")
    loss = cfg.get("loss") or {}
    if loss.get("impl") not in ("fused", "plain"):
        raise ConfigError(f"loss.impl={loss.get('impl')!r}: use fused or plain")
    if not is_number(loss.get("chunk_mb")) or loss["chunk_mb"] <= 0:
        raise ConfigError(f"loss.chunk_mb={loss.get('chunk_mb')!r}: give a positive number of MB per logits chunk")
    sched = cfg.get("scheduler") or {}
    if not is_int(sched.get("warmup_steps")) or sched["warmup_steps"] < 0:
        raise ConfigError(f"scheduler.warmup_steps={sched.get('warmup_steps')!r}: give a whole number >= 0")
    ratio = sched.get("min_lr_ratio")
    if not is_number(ratio) or not 0 <= ratio <= 1:
        raise ConfigError(f"scheduler.min_lr_ratio={ratio!r}: give a number between 0 and 1")
    trainer = cfg.get("trainer") or {}
    max_steps = trainer.get("max_steps")
    if not is_int(max_steps) or (max_steps < 1 and max_steps != -1):
        raise ConfigError(f"trainer.max_steps={max_steps!r}: give a whole number >= 1 (or -1 with max_epochs)")
    interval = trainer.get("val_check_interval")
    if interval is not None and (not is_number(interval) or interval <= 0 or
                                 (isinstance(interval, float) and interval > 1)):
        raise ConfigError(f"trainer.val_check_interval={interval!r}: give whole optimizer steps >= 1 "
                          "(or a fraction of an epoch in (0, 1])")
    for key in ("log_every_n_steps", "accumulate_grad_batches"):
        if key in trainer and (not is_int(trainer[key]) or trainer[key] < 1):
            raise ConfigError(f"trainer.{key}={trainer[key]!r}: give a whole number >= 1")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (not is_number(clip) or clip < 0):
        raise ConfigError(f"trainer.gradient_clip_val={clip!r}: give a number >= 0, or null for no clipping")
    check_sampling(cfg.get("sampling") or {}, prefix="sampling.")


def check_sampling(opts: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Sampling options as `generate` needs them; null means "not set" (the checkpoint's preset or off)."""
    out = dict(opts)
    if "max_new_tokens" in opts and opts["max_new_tokens"] is not None:
        if not is_int(opts["max_new_tokens"]) or opts["max_new_tokens"] < 0:
            raise ConfigError(f"{prefix}max_new_tokens={opts['max_new_tokens']!r}: give a whole number >= 0")
    temperature = opts.get("temperature")
    if temperature is not None and (not is_number(temperature) or temperature < 0):
        raise ConfigError(f"{prefix}temperature={temperature!r}: give a number >= 0 (0 is greedy)")
    top_k = opts.get("top_k")
    if top_k is not None and (not is_int(top_k) or top_k < 0):
        raise ConfigError(f"{prefix}top_k={top_k!r}: give a whole number >= 1 (0 or null: no top-k)")
    top_p = opts.get("top_p")
    if top_p is not None and (not is_number(top_p) or not 0 <= top_p <= 1):
        raise ConfigError(f"{prefix}top_p={top_p!r}: give a number in [0, 1] (1 or null: no top-p; "
                          "0 keeps only the most likely token)")
    penalty = opts.get("repetition_penalty")
    if penalty is not None and (not is_number(penalty) or penalty <= 0):
        raise ConfigError(f"{prefix}repetition_penalty={penalty!r}: give a number > 0 (1 is no penalty)")
    return out


def innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def first_line(err: BaseException) -> str:
    """The message a library meant for a person: the innermost cause's first line."""
    text = str(innermost(err)).strip().splitlines()
    return text[0] if text else type(innermost(err)).__name__


def joined_lines(err: BaseException, limit: int = 300) -> str:
    """A library's whole message as one line: torch's load_state_dict names the keys on the lines after its
    first ("Error(s) in loading state_dict for GPT:")."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    if not text:
        return type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


@contextlib.contextmanager
def config_errors(what: str) -> Iterator[None]:
    """Errors raised while building `what` from the config are configuration errors: say so in one line."""
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except EfficiaError:
        raise
    except (ValueError, TypeError, ArithmeticError, MisconfigurationException, InstantiationException,
            OmegaConfBaseException) as err:
        if isinstance(innermost(err), EfficiaError):  # already one clear line, wrapped by hydra.instantiate
            raise innermost(err) from None
        raise ConfigError(f"{what}: {first_line(err)}; fix the {what}.* overrides") from None


def check_fits(cfg: Mapping[str, Any], logged: tuple[str, ...]) -> None:
    """Cross-group checks: what one group asks of another, refused before the run instead of deep inside it."""
    seq_len, context = (cfg.get("data") or {}).get("seq_len"), (cfg.get("model") or {}).get("max_seq_len")
    if is_int(seq_len) and is_int(context) and seq_len > context:
        raise ConfigError(f"data.seq_len={seq_len} is longer than model.max_seq_len={context}; lower data.seq_len "
                          "or raise model.max_seq_len")
    for name, spec in (cfg.get("callbacks") or {}).items():
        monitor = spec.get("monitor") if isinstance(spec, Mapping) else None
        if monitor is not None and monitor not in logged:
            raise ConfigError(f"callbacks.{name}.monitor={monitor!r} is not a metric this run logs; use one of "
                              f"{', '.join(logged)}")
