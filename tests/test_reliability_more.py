"""More of what can go wrong in a run, through train(): an infinite (not NaN) loss, a NaN val/loss with
finite weights, resuming with a changed data.* key, and saves/signals under gradient accumulation."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from efficia.errors import CheckpointError, Stopped, TrainingError
from efficia.training.run import train
from tests.conftest import require_data
from tests.test_reliability import BASE, assert_same_weights, weights


class InfLossAt(Callback):
    """Test helper: one batch whose loss is +inf (not NaN) while the weights stay finite, as an overflow in
    the loss of one bad batch gives."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            loss = type(pl_module).loss
            pl_module.loss = lambda batch, reduction="mean": loss(pl_module, batch, reduction) + float("inf")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        pl_module.__dict__.pop("loss", None)
        if trainer.global_step > self.step:
            self.step = -1  # once


def inf_at(step: int) -> list[str]:
    return [f"+callbacks.inf._target_={__name__}.InfLossAt", f"+callbacks.inf.step={step}"]


def test_infinite_loss_stops_or_is_skipped(make_cfg, capsys) -> None:
    require_data()
    with pytest.raises(TrainingError, match=r"train/loss is inf at step 4: training diverged") as info:
        train(make_cfg(*BASE, "trainer.max_steps=6", *inf_at(3)))
    assert "\n" not in str(info.value)
    result = train(make_cfg(*BASE, "trainer.max_steps=6", "nonfinite_loss=skip", *inf_at(3)))
    assert result["global_step"] == 6
    assert "step 4: train/loss is inf; skipping this batch" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in weights(result["last_ckpt"]).values())


# -- resuming with a changed data key -----------------------------------------------------------------

@pytest.mark.parametrize("override", ["data.batch_size=7", "data.val_fraction=0.2", "seed=7"])
def test_resume_refuses_a_data_key_that_shapes_what_is_learned(make_cfg, override: str) -> None:
    """The batch, the split and the shuffled order are what the saved optimizer and data position were
    made with: changing one on resume is refused in one line naming it (resume.py's policy)."""
    require_data()
    first = train(make_cfg(*BASE, "trainer.max_steps=1", "trainer.val_check_interval=1"))
    key = override.split("=")[0]
    with pytest.raises(CheckpointError, match=rf"cannot change \(.*{key}=") as info:
        train(make_cfg(*BASE, "trainer.max_steps=2", override, f"ckpt_path={first['last_ckpt']}"))
    assert "\n" not in str(info.value)


# -- gradient accumulation: saves and signals land on optimizer-step boundaries ------------------------

class SignalAtBatch(Callback):
    """Test helper: a real SIGUSR1 at the end of training batch `batch` (0-based, counted over the run)."""

    def __init__(self, batch: int) -> None:
        self.batch, self.seen = batch, 0

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self.seen == self.batch:
            os.kill(os.getpid(), signal.SIGUSR1)
        self.seen += 1


ACCUMULATE = [*BASE, "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=100",
              "scheduler.warmup_steps=100", "data.batch_size=4"]


def test_saves_and_signals_under_accumulation_land_on_step_boundaries(make_cfg) -> None:
    """accumulate_grad_batches=2: a periodic save every 3 steps writes steps 3 (batch 6) ..., a signal in the
    middle of step 4 (batch 7 of 8) finishes that step and saves step 4; resuming from either reproduces the
    uninterrupted run's weights exactly."""
    require_data()
    straight = train(make_cfg(*ACCUMULATE, "trainer.max_steps=6"))

    seen: list[tuple[int, int]] = []
    original = torch.save

    def spy(obj, f, *a, **k):
        if isinstance(obj, dict) and "global_step" in obj:
            position = obj.get("ShakespeareDataModule", {}).get("batches")
            seen.append((obj["global_step"], position))
        return original(obj, f, *a, **k)

    cfg = make_cfg(*ACCUMULATE, "trainer.max_steps=6", "callbacks.checkpoint.every_n_steps=3",
                   f"+callbacks.signal._target_={__name__}.SignalAtBatch", "+callbacks.signal.batch=6")
    torch.save = spy
    try:
        with pytest.raises(Stopped, match="stopped by SIGUSR1 at step 4"):
            train(cfg)
    finally:
        torch.save = original
    assert seen == [(3, 6), (4, 8)], "each save at an optimizer step, its data position two batches a step"
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    resumed = train(make_cfg(*ACCUMULATE, "trainer.max_steps=6", f"ckpt_path={last}"))
    assert resumed["global_step"] == 6
    assert_same_weights(weights(resumed["last_ckpt"]), weights(straight["last_ckpt"]))


# -- a NaN val/loss while the weights are finite --------------------------------------------------------

class NaNValidation(Callback):
    """Test helper: every validation batch gives NaN logits (an overflow in evaluation); weights stay finite."""

    def __init__(self) -> None:
        self.hook = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.hook = pl_module.net.norm.register_forward_hook(lambda module, inputs, out: out * float("nan"))

    def on_validation_end(self, *args) -> None:
        self.hook.remove()


def test_nan_val_loss_with_finite_weights_is_not_a_success(make_cfg) -> None:
    """Early stopping ends the run on a NaN val/loss; train() must not report that as a finished run."""
    require_data()
    cfg = make_cfg(*BASE, "trainer.max_steps=8", "trainer.val_check_interval=4",
                   f"+callbacks.nanval._target_={__name__}.NaNValidation")
    with pytest.raises(TrainingError, match=r"val/loss is nan at step 4") as info:
        train(cfg)
    assert "\n" not in str(info.value)
