"""Where a run lives and what it may resume from.

- `ckpt_path=last` (the run folder must hold one) or `auto` (resume when it does) pick the newest last*.ckpt.
- A run folder is claimed once (`<run>/.efficia/`); a second run into it is refused, not silently mixed,
  unless it resumes from a checkpoint inside it. Hydra's `.hydra/` of the first run is put back.
- Resuming continues the saved optimizer, schedule and data order, so config keys that shape those must
  match the checkpoint's; differing ones are named in one line. Keys that only steer the run from here
  on (trainer, callbacks, logger, sampling, where data lives) are applied.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from efficia.build import read_checkpoint
from efficia.data.tokenizers import tokenizer_from_state
from efficia.errors import CheckpointError, ConfigError

MARKER = ".efficia"
# keys a resumed run may change: they steer the run from the checkpoint on, not what it learned so far
APPLIED_ON_RESUME = ("trainer.", "callbacks.", "logger.", "sampling.", "ckpt_path", "output_dir", "run_name",
                     "optimized_metric", "nonfinite_loss", "data.path", "data.url", "data.cache_dir",
                     "data.num_workers", "data.val_batch_size", "tokenizer.cache_dir")


def checkpoint_dir(cfg: DictConfig) -> Path:
    ckpt_cfg = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    return Path(ckpt_cfg.get("dirpath") or Path(cfg.output_dir) / "checkpoints")


def resolve_ckpt_path(value: Any, folder: Path) -> str | None:
    """A path stays a path; `last` / `auto` become the newest last*.ckpt in this run's checkpoint folder."""
    if value is None or value == "":
        return None
    if value not in ("last", "auto"):
        return str(value)
    found = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if found:
        return str(found[-1])
    if value == "auto":
        return None
    raise CheckpointError(f"ckpt_path=last: {folder} holds no last.ckpt; name the run folder to resume with "
                          "hydra.run.dir=outputs/<date>/<time> (train.py printed it), or pass ckpt_path=<a .ckpt>")


def is_primary_process() -> bool:
    """Launcher-spawned DDP workers re-run train() in the same folder; only the first process claims it."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def claim_run_dir(out: Path, ckpt_path: str | None) -> None:
    if not is_primary_process():
        return
    marker = out / MARKER
    used = marker.exists() or (out / "checkpoints").exists()
    resuming_here = ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(out.resolve())
    if used and not resuming_here:
        backup = marker / "hydra"
        if backup.is_dir():  # Hydra already rewrote .hydra/ for this refused command: put the run's own back
            shutil.copytree(backup, out / ".hydra", dirs_exist_ok=True)
        raise ConfigError(f"hydra.run.dir={out} already holds a run (its files are left as they were); drop "
                          f"hydra.run.dir to get a fresh folder, or resume that run: hydra.run.dir={out} "
                          "ckpt_path=last")
    try:
        marker.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the run folder {out} ({err.strerror}); give a writable "
                          "hydra.run.dir") from None
    if (out / ".hydra").is_dir():
        shutil.copytree(out / ".hydra", marker / "hydra", dirs_exist_ok=True)


def resume_command(out: Path) -> str:
    """The command that continues this run: its own overrides, its folder, and (added by the caller) ckpt_path."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task
                     if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    except (ValueError, AttributeError):
        overrides = ["<the same overrides>"]
    return " ".join(["python train.py", *overrides, f"hydra.run.dir={out}"])


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(ckpt_path: str, cfg: Mapping[str, Any], tokenizer_state: Mapping[str, Any]) -> None:
    """Same architecture, tokenizer, optimizer and data order as the checkpoint, or one line saying what differs."""
    hparams = read_checkpoint(ckpt_path)["hyper_parameters"]
    saved_cfg = hparams["cfg"]
    saved, model_cfg = saved_cfg["model"], cfg["model"]
    differ = sorted(k for k in set(saved) | set(model_cfg) if saved.get(k) != model_cfg.get(k))
    if differ:
        detail = ", ".join(f"{k}={saved.get(k)!r} there vs {model_cfg.get(k)!r} here" for k in differ)
        raise CheckpointError(f"ckpt_path={ckpt_path} holds a different model ({detail}); "
                              "resume with the overrides it was trained with")
    if dict(hparams["tokenizer_state"]) != dict(tokenizer_state):
        there = tokenizer_from_state(hparams["tokenizer_state"]).name
        here = tokenizer_from_state(dict(tokenizer_state)).name
        raise CheckpointError(f"ckpt_path={ckpt_path} was trained with tokenizer {there}, this run's tokenizer= and "
                              f"data give {here}; resume with the tokenizer and data it was trained on")
    then, now = flatten(saved_cfg), flatten(cfg)
    changed = sorted(k for k in then.keys() & now.keys()
                     if then[k] != now[k] and not k.startswith(APPLIED_ON_RESUME))
    if changed:
        detail = ", ".join(f"{k}={then[k]!r} there vs {now[k]!r} here" for k in changed)
        raise CheckpointError(f"ckpt_path={ckpt_path}: a resumed run continues the saved optimizer, schedule and "
                              f"data order, so these cannot change ({detail}); drop those overrides, or start a "
                              "new run without ckpt_path")
