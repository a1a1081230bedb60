"""The run: compose -> data -> model -> Trainer.fit, every piece instantiated from the config."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
import rich
import rich.syntax
import rich.tree
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import efficia.config  # noqa: F401  (registers the ${mixed_precision:} resolver recipes use)
from efficia.checkpoint import read_checkpoint
from efficia.errors import CheckpointError
from efficia.module import LanguageModule


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    tree = rich.tree.Tree("config", guide_style="dim")
    for group in ("model", "data", "tokenizer", "optimizer", "scheduler", "trainer", "callbacks", "logger"):
        if group in cfg and cfg[group] is not None:
            body = OmegaConf.to_yaml(cfg[group], resolve=True)
            tree.add(group).add(rich.syntax.Syntax(body, "yaml"))
    rich.print(tree)


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_loggers(logger_cfg: DictConfig | None) -> list:
    loggers = []
    for name, spec in (logger_cfg or {}).items():
        if spec is None:
            continue
        if name == "wandb" and not spec.get("offline") and (
                os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled") or not wandb_logged_in()):
            spec = OmegaConf.merge(spec, {"offline": True})
        loggers.append(instantiate(spec))
    return loggers


def build_callbacks(callbacks_cfg: DictConfig | None) -> list:
    return [instantiate(spec) for spec in (callbacks_cfg or {}).values() if spec is not None]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit one run. Returns the final metrics and where its artifacts are."""
    L.seed_everything(cfg.seed, workers=True)
    print_config(cfg)
    datamodule = instantiate(cfg.data, tokenizer=OmegaConf.to_container(cfg.tokenizer, resolve=True))
    datamodule.prepare()
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("ckpt_path"):
        check_resumable(cfg.ckpt_path, plain_cfg["model"])
    module = LanguageModule(plain_cfg, datamodule.tokenizer.state())
    n_params = module.net.num_params()
    rank_zero_only(print)(f"model={cfg.model.name}: {n_params:,} parameters ({n_params / 1e6:.2f}M); "
                          f"vocab {datamodule.tokenizer.vocab_size} ({datamodule.tokenizer.name}); "
                          f"{len(datamodule.train_tokens):,} train / {len(datamodule.val_tokens):,} val tokens")
    loggers = build_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg.get("callbacks")),
                                     logger=loggers or False)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        finish_wandb(loggers)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the next run in this process starts clean
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = {"metrics": metrics, "params": n_params, "global_step": trainer.global_step,
              **artifacts(trainer, cfg, loggers)}
    report(result, cfg)
    return result


def check_resumable(ckpt_path: str, model_cfg: dict[str, Any]) -> None:
    """Resuming needs the same architecture and sizes; say which differ instead of a state-dict trace."""
    saved = read_checkpoint(ckpt_path)["hyper_parameters"]["cfg"]["model"]
    differ = sorted(k for k in set(saved) | set(model_cfg) if saved.get(k) != model_cfg.get(k))
    if differ:
        detail = ", ".join(f"{k}={saved.get(k)!r} there vs {model_cfg.get(k)!r} here" for k in differ)
        raise CheckpointError(f"ckpt_path={ckpt_path} holds a different model ({detail}); "
                              "resume with the overrides it was trained with")


def finish_wandb(loggers: list) -> None:
    """One W&B run per Hydra multirun job: close this job's run before the next starts."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


def artifacts(trainer: L.Trainer, cfg: DictConfig, loggers: list) -> dict[str, Any]:
    ckpt_cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    out: dict[str, Any] = {
        "last_ckpt": ckpt_cb.last_model_path if ckpt_cb and ckpt_cb.last_model_path else None,
        "best_ckpt": ckpt_cb.best_model_path if ckpt_cb and ckpt_cb.best_model_path else None,
        "log_dirs": [lg.save_dir if isinstance(lg, WandbLogger) else lg.log_dir for lg in loggers],
        "loss_curve": None,
        "wandb_offline_dirs": [],
    }
    if cfg.get("callbacks") and cfg.callbacks.get("loss_curve"):
        png = Path(cfg.callbacks.loss_curve.filename)
        out["loss_curve"] = str(png) if png.is_file() else None
    for lg in loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_offline", False) and lg.experiment is not None:
            out["wandb_offline_dirs"].append(str(Path(lg.experiment.dir).parent))
    return out


@rank_zero_only
def report(result: dict[str, Any], cfg: DictConfig) -> None:
    m = result["metrics"]
    lines = [f"done: {result['global_step']} steps"]
    if "val/loss" in m:
        lines[0] += f"; val/loss {m['val/loss']:.4f}, val/bpb {m.get('val/bpb', float('nan')):.4f}"
    if result["best_ckpt"]:
        lines.append(f"best checkpoint: {result['best_ckpt']}")
    if result["last_ckpt"]:
        lines.append(f"last checkpoint: {result['last_ckpt']}")
    for d in result["log_dirs"]:
        lines.append(f"logs: {d}")
    for d in result["wandb_offline_dirs"]:
        lines.append(f"W&B ran offline; upload later with: wandb sync {d}")
    if result["loss_curve"]:
        lines.append(f"loss curve: {result['loss_curve']}")
    ckpt = result["best_ckpt"] or result["last_ckpt"]
    if ckpt:
        lines.append(f'sample: python sample.py ckpt={ckpt} prompt="ROMEO:"')
    print("\n".join(lines))
