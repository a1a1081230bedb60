"""The run: compose -> data -> model -> Trainer.fit, every piece instantiated from the config."""

from __future__ import annotations

import logging
import netrc
import os
import warnings
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
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import efficia.config  # noqa: F401  (registers the ${mixed_precision:} resolver recipes use)
from efficia.checks import check_fits, check_run_config, config_errors
from efficia.data.base import DataModule
from efficia.errors import ConfigError, TrainingError
from efficia.training.budget import CpuBudget, apply_flops_budget, check_budget
from efficia.training.callbacks import FinalValidation
from efficia.training.checkpointing import (
    AtomicCheckpointIO,
    GracefulStop,
    LoggerStep,
    RNGState,
    find_checkpoint_callback,
    weights_finite,
)
from efficia.training.hardware import say_where_ddp_runs
from efficia.training.init_from import check_tokenizer, init_source, start_from
from efficia.training.module import TrainingModule
from efficia.training.resume import check_resumable, checkpoint_dir, claim_run_dir, resolve_ckpt_path, resume_command

LIGHTNING_NOISE = (  # lines about Lightning, not about the run
    "💡 Tip:",                       # advertisements for Lightning's cloud products
    "TPU available:", "HPU available:",
    "was configured so 100% of the batches",  # Trainer(limit_val_batches=1.0) restated
)


class DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in LIGHTNING_NOISE)


def quiet_lightning() -> None:
    """A default run prints its config, its progress and its results, not Lightning's tips or the
    deprecation notices its internals raise against the installed torch."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, DropLightningNoise) for f in log.filters):
            log.addFilter(DropLightningNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning,
                            module=r"lightning\.")


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
        if spec.get("save_dir"):
            try:  # loggers create their folders lazily, deep inside fit: find out now
                Path(spec.save_dir).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"logger.{name}.save_dir={spec.save_dir} cannot be created ({err.strerror}); "
                                  "give a writable folder") from None
        if name == "wandb" and not spec.get("offline") and (
                os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled") or not wandb_logged_in()):
            spec = OmegaConf.merge(spec, {"offline": True})
        loggers.append(instantiate(spec))
    return loggers


def build_callbacks(callbacks_cfg: DictConfig | None) -> list:
    return [instantiate(spec) for spec in (callbacks_cfg or {}).values() if spec is not None]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit one run. Returns the final metrics and where its artifacts are."""
    cfg, source = init_source(cfg)  # init_from=: the model config (and later the weights) of a trained model
    with config_errors("config"):
        plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    quiet_lightning()
    check_run_config(plain_cfg)
    check_fits(plain_cfg, TrainingModule.LOGGED)
    check_budget(plain_cfg)
    output_dir = Path(cfg.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir(cfg))
    claim_run_dir(output_dir, ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    print_config(cfg)
    with config_errors("data"):
        datamodule = instantiate(cfg.data, tokenizer=plain_cfg["tokenizer"])
    if not isinstance(datamodule, DataModule):
        raise ConfigError(f"data._target_={cfg.data.get('_target_')} is a {type(datamodule).__name__}, not an "
                          "efficia.data.base.DataModule; subclass it (prepare, describe, the loaders)")
    datamodule.prepare()
    context = plain_cfg["model"].get("max_seq_len")
    if isinstance(context, int) and datamodule.longest > context:
        raise ConfigError(f"the data yield sequences of {datamodule.longest} tokens (training or validation), longer "
                          f"than model.max_seq_len={context}; raise model.max_seq_len or shorten the data")
    if ckpt_path:
        check_resumable(ckpt_path, plain_cfg, datamodule.tokenizer.state())
    if source is not None:
        check_tokenizer(source, datamodule.tokenizer, cfg.init_from)
    # no config_errors here: the registry and the constructors refuse bad model settings in one line (ConfigError);
    # anything else a constructor raises is a bug and keeps its traceback
    module = TrainingModule(plain_cfg, datamodule.tokenizer.state())
    if source is not None:
        start_from(module.net, source, cfg.get("train_only"))
        rank_zero_only(print)(f"starting from init_from={cfg.init_from} at step 0 (new optimizer and schedule)")
    with config_errors("optimizer"):  # built again inside fit; refuse bad values (Muon's too) before any work
        module.optimizer_and_schedule(1)
    n_params = module.net.num_params()
    rank_zero_only(print)(f"model={cfg.model.name}: {n_params:,} parameters ({n_params / 1e6:.2f}M); "
                          f"vocab {datamodule.tokenizer.vocab_size} ({datamodule.tokenizer.name}); "
                          f"{datamodule.describe()}")
    with config_errors("logger"):
        loggers = build_loggers(cfg.get("logger"))
    with config_errors("callbacks"):
        callbacks = build_callbacks(cfg.get("callbacks"))
    stop = GracefulStop(resume_command(output_dir))
    if plain_cfg["budget"]["cpu_seconds"] is not None:
        callbacks.append(CpuBudget(plain_cfg["budget"]["cpu_seconds"]))
    with config_errors("trainer"):
        # LoggerStep first: every other callback that logs at a batch's start (the LR monitor) sees its step
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[LoggerStep(), *callbacks, FinalValidation(), stop,
                                                                    RNGState()],
                                         logger=loggers or False, plugins=[AtomicCheckpointIO()])
    say_where_ddp_runs(trainer)
    line = apply_flops_budget(trainer, plain_cfg, datamodule.tokenizer.vocab_size, datamodule.batch_size)
    if line:
        rank_zero_only(print)(line)
    try:
        with stop:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if not weights_finite(module):  # e.g. EarlyStopping ended the run on a NaN val/loss: not a success
            raise TrainingError(f"training diverged: the weights are not finite after step {trainer.global_step} "
                                "(lower optimizer.lr, raise scheduler.warmup_steps or keep "
                                "trainer.gradient_clip_val)")
    except SIGTERMException:  # Lightning's own SIGTERM path (a signal during validation): saved in on_exception
        raise stop.stopped(trainer.global_step, stop.saved_path) from None
    except TrainingError as err:
        ckpt_cb = find_checkpoint_callback(trainer)
        last = ckpt_cb.last_model_path if ckpt_cb is not None and ckpt_cb.last_model_path else None
        raise TrainingError(f"{err}. Checkpoints on disk are from finite steps only"
                            + (f"; the last one: {last}" if last else "")) from None
    finally:
        finish_wandb(loggers)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the next run in this process starts clean
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = {"metrics": metrics, "params": n_params, "global_step": trainer.global_step,
              **artifacts(trainer, cfg, loggers)}
    report(result, cfg)
    return result


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


def example_prompt(cfg: DictConfig) -> str:
    """A prompt the run's tokenizer takes: token ids for `tokenizer=ids` (MQAR: a key/value pair, then the key),
    text otherwise."""
    if cfg.get("tokenizer") and cfg.tokenizer.get("kind") == "ids":
        vocab = int(cfg.data.get("vocab_size") or 2)
        return f"1 {vocab // 2} 1"
    return "ROMEO:"


@rank_zero_only
def report(result: dict[str, Any], cfg: DictConfig) -> None:
    m = result["metrics"]
    lines = [f"done: {result['global_step']} steps"]
    if "val/loss" in m:
        lines[0] += f"; val/loss {m['val/loss']:.4f}, val/bpb {m.get('val/bpb', float('nan')):.4f}"
    if "val/recall_acc" in m:
        lines[0] += f", val/recall_acc {m['val/recall_acc']:.4f}"
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
        lines.append(f'sample: python sample.py ckpt={ckpt} prompt="{example_prompt(cfg)}"')
    print("\n".join(lines))
