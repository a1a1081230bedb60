"""Callbacks: the loss-curve PNG written at the end of fit, and tokens/s in the progress bar."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only


class LossCurve(Callback):
    """Records train/loss every step and val/loss at every validation; plots both at the end of fit.

    The history is part of the checkpoint, so a resumed run plots its whole curve.
    """

    def __init__(self, filename: str) -> None:
        self.path = Path(filename)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step % trainer.log_every_n_steps:
            return  # reading the loss forces a device sync: only as often as the loggers do
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs  # {} for a skipped step
        if loss is not None and trainer.global_step > 0:
            self.train.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val = trainer.callback_metrics.get("val/loss")
        if val is not None and not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(val)))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train and not self.val:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if self.train:
            ax.plot(*zip(*self.train, strict=True), label="train/loss", alpha=0.6, linewidth=0.8)
        if self.val:
            ax.plot(*zip(*self.val, strict=True), "o-", label="val/loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{pl_module.cfg['model']['name']}: {pl_module.net.num_params() / 1e6:.2f}M params")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(self.path, dpi=110)
        except OSError as err:  # a plot is not worth losing the run's report over
            print(f"warning: loss curve not written to {self.path} ({err.strerror or err})", file=sys.stderr)
        finally:
            plt.close(fig)

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = [tuple(p) for p in state_dict.get("train", [])]
        self.val = [tuple(p) for p in state_dict.get("val", [])]


class TokensPerSecond(Callback):
    """Training throughput (all processes) in the progress bar and the logs, smoothed over steps.

    Timed from one batch end to the next, so data loading counts and asynchronous GPU work is paid
    for in steady state without forcing a sync; the clock restarts after each validation.
    """

    def __init__(self, smoothing: float) -> None:
        self.smoothing = smoothing
        self.rate: float | None = None
        self.last_end: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self.last_end is not None:
            rate = batch[0].numel() * trainer.world_size / max(now - self.last_end, 1e-9)
            self.rate = rate if self.rate is None else self.smoothing * self.rate + (1 - self.smoothing) * rate
            pl_module.log("tok/s", self.rate, prog_bar=True)
        self.last_end = now

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_end = None
