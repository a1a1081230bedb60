"""How much training a run gets: optimizer steps (`trainer.max_steps`), wall time (`trainer.max_time`), training
FLOPs (`budget.flops`) or process CPU seconds (`budget.cpu_seconds`).

A FLOPs budget becomes a step count before training starts (FLOPs per token are counted for the model,
efficia.training.throughput), so a model that costs less per token trains on more tokens and its cosine schedule
still ends on its last step. CPU seconds are the fair clock on a shared machine: another process slows a run's
wall time, not the CPU time it is given. Like a wall-clock limit, they have no last step known in advance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from efficia.errors import ConfigError
from efficia.training.throughput import run_flops_per_token


def check_budget(cfg: Mapping[str, Any]) -> None:
    budget = cfg.get("budget") or {}
    for key in ("flops", "cpu_seconds"):
        value = budget.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"budget.{key}={value!r}: give a positive number, or null for no such limit")
    if budget.get("flops") is not None and budget.get("cpu_seconds") is not None:
        raise ConfigError("budget.flops and budget.cpu_seconds are both set: a run has one budget; set the other "
                          "to null")


def describe_budget(cfg: Mapping[str, Any]) -> str:
    """What limits the run, in the words a report states it."""
    budget, trainer = cfg.get("budget") or {}, cfg.get("trainer") or {}
    if budget.get("flops") is not None:
        return f"equal training FLOPs: {budget['flops']:.3g} per run"
    if budget.get("cpu_seconds") is not None:
        return f"equal CPU time: {budget['cpu_seconds']:g} process CPU seconds per run"
    if trainer.get("max_time") is not None:
        return f"equal wall time: {trainer['max_time']} (DD:HH:MM:SS) per run"
    return f"equal steps: {trainer.get('max_steps')} optimizer steps per run"


def steps_for_flops(cfg: Mapping[str, Any], vocab_size: int, batch_size: int, world_size: int) -> tuple[int, float]:
    """(optimizer steps that spend budget.flops, FLOPs per token)."""
    flops_per_token, seq_len = run_flops_per_token(cfg, vocab_size)
    per_step = flops_per_token * batch_size * seq_len * world_size
    steps = int(cfg["budget"]["flops"] // per_step)
    if steps < 1:
        raise ConfigError(f"budget.flops={cfg['budget']['flops']:.3g} is less than one optimizer step of this model "
                          f"({per_step:.3g} FLOPs: batch {batch_size} x seq_len {seq_len}); raise it")
    return steps, flops_per_token


def apply_flops_budget(trainer: L.Trainer, cfg: Mapping[str, Any], vocab_size: int, batch_size: int) -> str | None:
    """Sets the trainer's max_steps from budget.flops; returns the line that says so (None without one)."""
    if (cfg.get("budget") or {}).get("flops") is None:
        return None
    steps, flops_per_token = steps_for_flops(cfg, vocab_size, batch_size, trainer.world_size)
    trainer.fit_loop.epoch_loop.max_steps = steps
    return (f"budget: {cfg['budget']['flops']:.3g} training FLOPs = {steps:,} optimizer steps at "
            f"{flops_per_token / 1e6:,.2f} MFLOP per token (trainer.max_steps ignored)")


class CpuBudget(Callback):
    """Stops training once the run has used `seconds` of process CPU time (validation included, earlier sessions
    of a resumed run too); the last step is then validated like any last step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.prior = 0.0
        self.start: float | None = None

    def used(self) -> float:
        return self.prior + (time.process_time() - self.start if self.start is not None else 0.0)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.used() >= self.seconds:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"cpu_s": self.used()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.prior = float(state_dict.get("cpu_s", 0.0))
