"""Is the Wikipedia stream the bottleneck? Tokens/s of the data pipeline alone (read, tokenize, pack,
hand over through the DataLoader) next to tokens/s of the real training loop fed by it, with 0 and 2
DataLoader workers, measured one after another in the same process.

    python bench/wikipedia_loader.py                              # gpt2 tokens, gpt at scale=small, local sample
    python bench/wikipedia_loader.py steps=100 tokenizer=byte data.files='/data/wiki/*.parquet'

Without data.files (or $EFFICIA_WIKIPEDIA_FILES) it reads $EFFICIA_DATA_DIR/wikipedia-sample/*.parquet.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficia.config import compose_run  # noqa: E402
from efficia.training.run import train  # noqa: E402


class StepClock(Callback):
    """Wall time from the end of the first training batch to the end of the last (start-up excluded)."""

    instances: list[StepClock] = []

    def __init__(self) -> None:
        StepClock.instances.append(self)
        self.first: float | None = None
        self.last: float | None = None
        self.steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.steps += 1
        self.last = now


def loader_rate(cfg, seconds: float) -> tuple[float, float]:
    """(tokens/s after the first batch, seconds to the first batch) of the training DataLoader alone."""
    dm = instantiate(cfg.data, tokenizer=OmegaConf.to_container(cfg.tokenizer, resolve=True))
    dm.prepare()
    start = time.perf_counter()
    tokens, first = 0, None
    for batch in dm.train_dataloader():
        now = time.perf_counter()
        if first is None:
            first = now
            continue
        tokens += batch[0].numel()
        if now - first > seconds:
            break
    return tokens / (time.perf_counter() - first), first - start


def train_rate(cfg) -> float:
    """Tokens/s of the real training loop (the clock is one of the run's callbacks, see main)."""
    train(cfg)
    clock = StepClock.instances[-1]
    return clock.steps * cfg.data.batch_size * cfg.data.seq_len / (clock.last - clock.first)


def main(argv: list[str]) -> None:
    steps = next((int(a.split("=")[1]) for a in argv if a.startswith("steps=")), 200)
    overrides = [a for a in argv if not a.startswith("steps=")]
    if not any(a.startswith("data.files=") for a in overrides) and not os.environ.get("EFFICIA_WIKIPEDIA_FILES"):
        overrides.append(f"data.files={Path(os.environ.get('EFFICIA_DATA_DIR', '.')) / 'wikipedia-sample'}/*.parquet")
    rows = []
    for workers in (0, 2):
        cfg = compose_run(["data=wikipedia", "scale=small", "logger=csv", f"trainer.max_steps={steps}",
                           "trainer.limit_val_batches=0", "callbacks.early_stopping=null", "callbacks.checkpoint=null",
                           "callbacks.progress_bar=null", "callbacks.loss_curve=null",
                           "+trainer.enable_progress_bar=false", "+callbacks.step_clock._target_=__main__.StepClock",
                           f"data.num_workers={workers}", *overrides],
                          Path("bench/results/wikipedia_loader"))
        alone, first = loader_rate(cfg, seconds=5.0)
        trained = train_rate(cfg)
        rows.append((workers, cfg.tokenizer.get("encoding", cfg.tokenizer.kind), cfg.model.name, first, alone, trained))
    print("\n| workers | tokenizer | model | first batch s | loader alone tokens/s | training tokens/s "
          "| loader / training |\n|---|---|---|---|---|---|---|")
    for workers, tok, model, first, alone, trained in rows:
        print(f"| {workers} | {tok} | {model} | {first:.2f} | {alone:,.0f} | {trained:,.0f} | {alone / trained:.0f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
