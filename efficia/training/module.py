"""The LightningModule: loss, validation metrics and optimizer wiring, the same for every architecture."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from efficia.build import build_model
from efficia.data.base import IGNORE, DataModule
from efficia.data.tokenizers import tokenizer_from_state
from efficia.errors import TrainingError
from efficia.models.output import linear_cross_entropy
from efficia.training.callbacks import loggers_write_at
from efficia.training.muon import split_for_muon


class BitsPerByte(Metric):
    """Summed nats over summed UTF-8 bytes of the targets, in bits: comparable across tokenizers."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, token_nats: Tensor, token_bytes: Tensor) -> None:
        self.nats += token_nats.double().sum()
        self.bytes += token_bytes.double().sum()

    def compute(self) -> Tensor:
        return self.nats / self.bytes / math.log(2)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to min_lr_ratio at total_steps (held after)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainingModule(L.LightningModule):
    """Wraps any registered architecture. `cfg` is the whole resolved run config (plain types), kept in
    the checkpoint together with the tokenizer state so a checkpoint alone rebuilds model and tokenizer."""

    LOGGED = ("val/loss", "val/ppl", "val/bpb", "val/recall_acc", "train/loss", "train/tokens")  # may be monitored

    def __init__(self, cfg: dict[str, Any], tokenizer_state: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = cfg
        self.tokenizer = tokenizer_from_state(tokenizer_state)
        self.net = build_model(cfg["model"], self.tokenizer.vocab_size)
        self.register_buffer("token_bytes", self.tokenizer.token_byte_lengths(), persistent=False)
        self.val_loss = MeanMetric()
        self.val_bpb = BitsPerByte()
        self.recall_acc = self.answer_accuracy()
        self.recall_acc_by_set = torch.nn.ModuleList()  # one per named validation set, made in setup()
        self.val_names: list[str] = ["val"]
        self.tokens_seen = 0
        # one training window: Lightning's model summary counts its forward FLOPs (instead of "Total FLOPs: 0")
        seq_len = cfg.get("data", {}).get("seq_len") or cfg["model"]["max_seq_len"]
        self.example_input_array = torch.zeros(1, seq_len, dtype=torch.long)

    def forward(self, idx: Tensor) -> Tensor:
        return self.net(idx)

    def answer_accuracy(self) -> MulticlassAccuracy:
        """Share of scored targets (not IGNORE) whose most likely token is the target: recall tasks' answers."""
        return MulticlassAccuracy(num_classes=self.tokenizer.vocab_size, average="micro", ignore_index=IGNORE,
                                  validate_args=False)

    def setup(self, stage: str) -> None:
        """Several validation sets (e.g. MQAR's test settings) get an accuracy each, logged under their names."""
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        names = datamodule.val_names if isinstance(datamodule, DataModule) else ["val"]
        if len(names) > 1 and len(self.recall_acc_by_set) != len(names):
            self.val_names = list(names)
            self.recall_acc_by_set = torch.nn.ModuleList(self.answer_accuracy() for _ in names)

    def outputs(self, x: Tensor) -> Tensor:
        """Final hidden states [B, T, C]: the output unit makes logits only chunk by chunk."""
        return self.net.hidden(x)

    def output_loss(self, out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy of `outputs(x)` through the output unit (`loss.impl`: fused chunks or plain logits);
        a target of IGNORE (-100) costs 0 and is not counted. "none": per-position nats [B*T]."""
        cfg = self.cfg["loss"]
        rows = max(1, int(cfg["chunk_mb"] * 2**20) // (4 * self.net.head_weight.shape[0]))
        return linear_cross_entropy(out, self.net.head_weight, y, impl=cfg["impl"], chunk_size=rows,
                                    ignore_index=IGNORE, reduction=reduction)

    def loss(self, batch: tuple[Tensor, Tensor], reduction: str = "mean") -> Tensor:
        """The training loss of a batch: the mean over scored positions only."""
        x, y = batch
        return self.output_loss(self.outputs(x), y, reduction)

    def token_losses(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-position nats [B*T] (0 where IGNORE) and the targets [B, T]."""
        return self.loss(batch, reduction="none"), batch[1]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        y = batch[1]
        loss = self.loss(batch)
        if not torch.isfinite(loss):  # one host sync per step: the price of naming the step that diverged
            return self.non_finite(loss)
        self.tokens_seen += y.numel() * self.trainer.world_size
        if loggers_write_at(self.trainer, self.global_step + 1):
            self.log_dict({"train/loss": loss, "train/tokens": float(self.tokens_seen)}, prog_bar=True)
        return loss

    def non_finite(self, loss: Tensor) -> None:
        """`nonfinite_loss: stop` ends the run with one line; `skip` drops this batch's optimizer step."""
        step = self.global_step + 1
        if self.cfg["nonfinite_loss"] == "skip":
            if all(p.isfinite().all() for p in self.net.parameters()):
                self.print(f"step {step}: train/loss is {float(loss)}; skipping this batch (nonfinite_loss=skip)")
                return None
            raise TrainingError(f"train/loss is {float(loss)} at step {step} and the weights are no longer finite, "
                                "so skipping batches cannot recover: lower optimizer.lr or raise "
                                "scheduler.warmup_steps")
        raise TrainingError(f"train/loss is {float(loss)} at step {step}: training diverged (lower optimizer.lr, "
                            "raise scheduler.warmup_steps or keep trainer.gradient_clip_val); nonfinite_loss=skip "
                            "skips such batches instead")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        out = self.outputs(x)  # [B, T, C]: no [B, T, V] logits (GPT-2: 823 MB for a 64 x 64 batch)
        losses, targets = self.output_loss(out, y, "none"), y.flatten()
        scored = targets != IGNORE
        self.val_loss.update(losses[scored])
        self.val_bpb.update(losses[scored], self.token_bytes[targets[scored]])
        if not bool(scored.all()):  # a batch with a target mask (recall tasks): accuracy on its answers
            predictions = torch.zeros_like(targets)  # logits of the scored positions only
            rows = out.flatten(0, 1)[scored]
            predictions[scored] = F.linear(rows, self.net.head_weight).argmax(-1)
            predictions = predictions.view_as(y)
            self.recall_acc.update(predictions, y)
            if len(self.recall_acc_by_set):
                self.recall_acc_by_set[dataloader_idx].update(predictions, y)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        if not torch.isfinite(loss) and all(p.isfinite().all() for p in self.net.parameters()):
            # finite weights, non-finite held-out loss: early stopping would end the run as if it had finished
            raise TrainingError(f"val/loss is {float(loss)} at step {self.global_step} while the weights are "
                                "finite: evaluation overflowed or the held-out data is bad (try "
                                "trainer.precision=32-true, check the data)")
        values = {"val/loss": loss, "val/ppl": loss.exp(), "val/bpb": self.val_bpb.compute()}
        if self.recall_acc.update_called:
            values["val/recall_acc"] = self.recall_acc.compute()
        self.log_dict(values, prog_bar=True, sync_dist=False)
        per_set = {f"val/recall_acc/{name}": metric.compute()
                   for name, metric in zip(self.val_names, self.recall_acc_by_set, strict=False)  # empty: one set
                   if metric.update_called}
        if per_set:
            self.log_dict(per_set, sync_dist=False)
        for metric in (self.val_loss, self.val_bpb, self.recall_acc, *self.recall_acc_by_set):
            metric.reset()

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The configured optimizer's param groups (see optimizer_and_schedule); also what the GPU memory budget
        measures the optimizer's state on."""
        params = {name: p for name, p in self.net.named_parameters() if p.requires_grad}
        groups = []
        if getattr(get_class(self.cfg["optimizer"]["_target_"]), "splits_hidden_matrices", False):
            hidden, _ = split_for_muon(self.net)
            groups.append({"params": [params.pop(name) for name in hidden], "muon": True})
        return groups + [
            {"params": [p for p in params.values() if p.dim() >= 2]},
            {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
        ]

    def optimizer_and_schedule(self, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """Weight decay (the optimizer's own `weight_decay`) on matrices (dim >= 2) only; biases, norms and gains
        are not decayed. An optimizer that `splits_hidden_matrices` (optimizer=muon) gets the model's hidden
        matrices as a group of their own, flagged `muon`. Also what bench/overhead.py's bare loop uses, so both
        loops step the same optimizer."""
        optimizer = instantiate(dict(self.cfg["optimizer"]), self.parameter_groups())
        sched = self.cfg["scheduler"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, sched["warmup_steps"], total_steps, sched["min_lr_ratio"])
        )
        return optimizer, scheduler

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = self.optimizer_and_schedule(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
