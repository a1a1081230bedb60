"""Nothing lost on stop, kill or NaN: atomic checkpoint files, `last.ckpt` on a clock and on signals,
every RNG in the checkpoint, and only finite weights ever written.

The pieces are small and independent so `training.py` only wires them:
- `AtomicCheckpointIO`: temporary file next to the target, fsync, `os.replace` (a kill never leaves half a file).
- `CheckpointWriter`: Lightning's ModelCheckpoint plus `last.ckpt` every N steps / minutes and at the end of fit;
  it refuses non-finite weights and never keeps a non-finite "best".
- `GracefulStop`: SIGTERM / SIGINT / SIGUSR1 finish the current optimizer step, write `last.ckpt`, then stop.
- `RNGState`: torch (CPU and CUDA), Python and NumPy generators saved and restored, for bit-exact resume.
- `LoggerStep`: a resumed run logs every metric at the step an uninterrupted run logs it.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from efficia.errors import ConfigError, Stopped

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
TMP_SUFFIX = ".tmp"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save into a temporary file in the target's own folder, fsync, then rename over the target.

    A temporary file elsewhere (e.g. $TMPDIR on another filesystem) would end in a copy, and a kill
    during that copy leaves a truncated target; a rename within one folder is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def remove_stale_temporaries(folder: str | Path) -> None:
    """A kill -9 during a save leaves its temporary file behind; the next run clears them."""
    for tmp in Path(folder).glob(f".*.ckpt.*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with the write done by `atomic_torch_save`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)


def weights_finite(module: torch.nn.Module) -> bool:
    """One device sync for the whole model, not one per parameter."""
    flags = [p.detach().isfinite().all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


class CheckpointWriter(ModelCheckpoint):
    """ModelCheckpoint that also writes `last.ckpt` every `every_n_steps` optimizer steps and every
    `every_minutes` minutes (either may be null), at the end of fit and when asked (`save_last_now`).

    A checkpoint is written only from finite weights, and a non-finite monitored value never becomes
    "best": after a NaN the files on disk are still the last good ones.
    """

    def __init__(self, *, every_n_steps: int | None, every_minutes: float | None, **kwargs: Any) -> None:
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ConfigError(f"callbacks.checkpoint.every_n_steps={every_n_steps!r}: give a whole number >= 1 "
                              "or null")
        if every_minutes is not None and (isinstance(every_minutes, bool) or
                                          not isinstance(every_minutes, int | float) or every_minutes <= 0):
            raise ConfigError(f"callbacks.checkpoint.every_minutes={every_minutes!r}: give a number > 0 or null")
        super().__init__(**kwargs)
        self.every_n_steps, self.every_minutes = every_n_steps, every_minutes
        self._last_written_step: int | None = None
        self._last_time = time.monotonic()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            remove_stale_temporaries(self.dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_skip_saving_checkpoint(trainer) or not at_step_boundary(trainer, batch_idx):
            return
        due = bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0
        if self.every_minutes:
            late = time.monotonic() - self._last_time >= self.every_minutes * 60
            due = due or trainer.strategy.broadcast(late, src=0)  # every process saves together
        if due:
            self.save_last_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.fast_dev_run and trainer.global_step > 0:
            self.save_last_now(trainer)

    def save_last_now(self, trainer: L.Trainer) -> str | None:
        """Write last.ckpt for the current step (once per step); returns its path, None if not written."""
        if not self.save_last:
            return None
        if self._last_written_step == trainer.global_step and self.last_model_path:
            return self.last_model_path
        saved_step = self._last_global_step_saved  # a periodic save must not suppress this step's "best"
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = saved_step
        return self.last_model_path if self._last_written_step == trainer.global_step else None

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if not weights_finite(trainer.lightning_module):
            rank_zero_warn(f"step {trainer.global_step}: the weights are not finite; last.ckpt is not overwritten")
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step = trainer.global_step
        self._last_time = time.monotonic()

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        current = monitor_candidates.get(self.monitor) if self.monitor else None
        if current is not None and not torch.isfinite(current).all():
            rank_zero_warn(f"step {trainer.global_step}: {self.monitor}={float(current)} is not finite; "
                           "no best checkpoint is written for it")
            return
        if not weights_finite(trainer.lightning_module):
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)


def at_step_boundary(trainer: L.Trainer, batch_idx: int) -> bool:
    """True after a batch that ended an optimizer step (not in the middle of gradient accumulation)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.fit_loop.epoch_loop.done


def find_checkpoint_callback(trainer: L.Trainer) -> CheckpointWriter | None:
    return next((c for c in trainer.callbacks if isinstance(c, CheckpointWriter)), None)


class GracefulStop(Callback):
    """SIGTERM, SIGINT (Ctrl-C) or SIGUSR1: finish the optimizer step in flight, write last.ckpt, stop.

    Used as a context manager around `trainer.fit` so the handlers never outlive the run; a second
    Ctrl-C stops at once (KeyboardInterrupt). The run then raises `Stopped` naming the checkpoint.
    """

    def __init__(self, resume_hint: str) -> None:
        self.resume_hint = resume_hint
        self.received: int | None = None
        self.saved_path: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if _in_main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: do not wait for the step
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and writing last.ckpt "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:  # a signal may reach one process only: all stop together
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and at_step_boundary(trainer, batch_idx):
            self.stop(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning's own SIGTERM handling raises between steps (also during validation): save there too
        if self.received is not None and isinstance(exception, SIGTERMException):
            self.saved_path = self.save(trainer)

    def save(self, trainer: L.Trainer) -> str | None:
        ckpt = find_checkpoint_callback(trainer)
        return ckpt.save_last_now(trainer) if ckpt is not None and not trainer.fast_dev_run else None

    def stop(self, trainer: L.Trainer) -> None:
        raise self.stopped(trainer.global_step, self.save(trainer))

    def stopped(self, step: int, path: str | None) -> Stopped:
        signum = self.received or signal.SIGTERM
        name = signal.Signals(signum).name
        if path:
            return Stopped(f"stopped by {name} at step {step}; last checkpoint: {path}. "
                           f"Resume with: {self.resume_hint} ckpt_path={path}", signum)
        return Stopped(f"stopped by {name} at step {step}; no checkpoint was written (checkpointing is off "
                       "or the weights were not finite)", signum)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class RNGState(Callback):
    """Every random generator in the checkpoint, restored when training restarts, for bit-exact resume.

    Restored at `on_train_start` (after the sanity check), so a resumed run continues from exactly the
    generator state the interrupted run had after its last saved step.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        np_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *[x.item() if hasattr(x, "item") else x
                                                           for x in np_state[2:]]],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.pending:
            return
        state, self.pending = self.pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


class LoggerStep(Callback):
    """A resumed run logs every metric at the step where an uninterrupted run logs it (CSV, W&B, any logger).

    Lightning passes its loggers `fit_loop.epoch_loop._batches_that_stepped`, which it increments at the very
    end of each step, after `on_train_batch_end` and after any validation. A checkpoint written in
    `on_train_batch_end` (a signal's save, `every_n_steps`) or at a validation's end (the final validation
    of a finished run, which writes that step's last.ckpt) holds the count from before the increment. On
    restore Lightning adds the missing one only when the save looks like `on_train_batch_end`; a save at a
    validation's end looks like one made after the step, so the resumed run logged one step early.
    `global_step` is restored exactly, and an uninterrupted run has count == global_step at the start of
    every batch, so the count is set from it at the first batch of each fit, after Lightning's own restore
    (doing it in `on_train_start` is too early: Lightning still adds its one to a signal's save).
    """

    def __init__(self) -> None:
        self.pending = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pending = pl_module.automatic_optimization  # manual: global_step counts every optimizer's steps

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.pending:
            self.pending = False
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
