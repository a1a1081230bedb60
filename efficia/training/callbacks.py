"""Callbacks: the loss-curve PNG, tokens/s and MFU, a validation of the final weights, and progress lines."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from efficia.data.base import IGNORE
from efficia.training.throughput import compute_dtype, peak_flops, run_flops_per_token


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


def loggers_write_at(trainer: L.Trainer, step: int) -> bool:
    """True when Lightning writes its loggers after optimizer step `step` (1-based), and at the last step so the
    final metrics are current. Values are logged only then: each self.log call walks Lightning's result
    collection, a measurable share of a small CPU step."""
    return step % trainer.log_every_n_steps == 0 or 0 < trainer.max_steps <= step


class Throughput(Callback):
    """Training tokens/s (all processes) and MFU in the progress bar and the logs, smoothed over steps.

    Timed from one batch end to the next, so data loading counts and asynchronous GPU work is paid
    for in steady state without forcing a sync; the clock restarts after each validation. MFU divides
    by measured numbers only (efficia.training.throughput): FLOPs counted for this model, the CPU's measured
    matmul peak or the GPU's datasheet peak; where no peak is known, MFU is not logged.

    A CPU peak measured while the machine was busy understates it (MFU read 190% on experiment=recall): an MFU
    above 100% measures the peak again and keeps the higher figure; if MFU still reads above 100%, one line says
    why and MFU is no longer logged. No MFU above 100% is ever logged.
    """

    def __init__(self, smoothing: float) -> None:
        self.smoothing = smoothing
        self.rate: float | None = None
        self.last_end: float | None = None
        self.flops_per_token: float | None = None
        self.head_flops = 0
        self.peak: float | None = None
        self.dtype = "fp32"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cfg = pl_module.cfg
        self.flops_per_token, seq_len = run_flops_per_token(cfg, pl_module.tokenizer.vocab_size)
        # the fused output unit gives logits to scored rows only (efficia.models.output): on recall data (1 scored
        # row in 8) the head's share of the count is done for those rows only, 2 FLOPs per weight forward, 4 back
        self.head_flops = 6 * pl_module.net.head_weight.numel() if cfg["loss"]["impl"] == "fused" else 0
        self.dtype = compute_dtype(trainer.precision, pl_module.device.type)
        self.peak, source = peak_flops(pl_module.device, self.dtype)
        peak = f"peak {self.peak / 1e9:,.0f} GFLOP/s ({source})" if self.peak else f"no MFU: {source}"
        rank_zero_info(f"throughput: {self.flops_per_token / 1e6:,.2f} MFLOP per token forward+backward "
                       f"(counted at seq_len {seq_len}); {peak}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self.last_end is not None:
            rate = batch[0].numel() * trainer.world_size / max(now - self.last_end, 1e-9)
            self.rate = rate if self.rate is None else self.smoothing * self.rate + (1 - self.smoothing) * rate
            if loggers_write_at(trainer, trainer.global_step):
                pl_module.log("tok/s", self.rate, prog_bar=True)
                if self.peak and self.flops_per_token:
                    unscored = (batch[1] == IGNORE).float().mean().item() if self.head_flops else 0.0
                    flops = self.flops_per_token - self.head_flops * unscored
                    mfu = self.mfu(self.rate * flops / trainer.world_size, pl_module.device)
                    if mfu is not None:
                        pl_module.log("mfu", mfu, prog_bar=True)
                    now = time.perf_counter()  # a peak measured again is not training time
        self.last_end = now

    def mfu(self, flops_per_second: float, device) -> float | None:
        """Achieved FLOP/s over the peak; above 1, a CPU's peak is measured again (it was measured on a busy
        machine); still above 1, one line says so and MFU is off for the rest of the run."""
        if flops_per_second > self.peak and device.type == "cpu":
            measured, _ = peak_flops(device, self.dtype)
            before, self.peak = self.peak, max(self.peak, measured)
            rank_zero_info(f"throughput: MFU read {flops_per_second / before:.0%} of the CPU peak measured at "
                           f"start ({before / 1e9:,.0f} GFLOP/s; the machine was busy then): measured again, "
                           f"{measured / 1e9:,.0f} GFLOP/s; peak {self.peak / 1e9:,.0f} GFLOP/s from here on")
        if flops_per_second > self.peak:
            rank_zero_info(f"throughput: training runs at {flops_per_second / 1e9:,.0f} GFLOP/s, above the "
                           f"{self.peak / 1e9:,.0f} GFLOP/s peak ({self.dtype}) it is measured against; the peak "
                           "understates this device (a busy machine, or a card not as listed), so MFU is not "
                           "logged from here on")
            self.peak = None
            return None
        return flops_per_second / self.peak

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_end = None


class FinalValidation(Callback):
    """`fit` ends with a validation of the final weights, whatever `val_check_interval` is, so `done:`,
    the best checkpoint and the metric a sweep minimises all describe what was saved.

    Setting `should_stop` on the last step is Lightning's own way (early stopping) to validate before
    leaving the loop; a step that validates anyway still validates once.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
        elif trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs \
                and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            trainer.should_stop = True


class PlainProgress(ProgressBar):
    """Progress as plain lines for logs, CI and nohup: a live bar there would print nothing until the end."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self.enabled = True
        self.start: float | None = None
        self.start_step = 0
        self.printed_step = -1

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        due = step % self.every == 0 or step == trainer.max_steps
        if not (self.enabled and trainer.is_global_zero and due) or step == self.printed_step:
            return
        self.printed_step = step
        metrics = trainer.progress_bar_metrics
        parts = [f"step {step}" + (f"/{trainer.max_steps}" if trainer.max_steps > 0 else "")]
        if "train/loss" in metrics:
            parts.append(f"loss {metrics['train/loss']:.4f}")
        if "tok/s" in metrics:
            parts.append(f"{metrics['tok/s']:,.0f} tok/s")
        if "mfu" in metrics:
            parts.append(f"MFU {metrics['mfu']:.0%}")
        done = step - self.start_step
        if trainer.max_steps > 0 and done > 0 and self.start is not None:
            left = (time.perf_counter() - self.start) / done * (trainer.max_steps - step)
            parts.append(f"ETA {left // 60:.0f}m{left % 60:02.0f}s")
        print(" | ".join(parts), flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if "val/loss" in metrics:
            recall = f", val/recall_acc {float(metrics['val/recall_acc']):.4f}" if "val/recall_acc" in metrics else ""
            print(f"step {trainer.global_step}: val/loss {float(metrics['val/loss']):.4f}, "
                  f"val/bpb {float(metrics.get('val/bpb', float('nan'))):.4f}{recall}", flush=True)


def progress_bar(refresh_rate: int, plain_every: int) -> ProgressBar:
    """A live Rich bar on a terminal; plain lines every `plain_every` steps when stdout is not one."""
    if sys.stdout.isatty():
        return RichProgressBar(refresh_rate=refresh_rate)
    return PlainProgress(plain_every)
