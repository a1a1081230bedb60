"""Honest hardware presets: behave like a card of `memory_gb` even on a bigger one.

On CUDA the process is capped to the budget, the largest micro-batch that trains within it is
found by trying real forward+backward passes, and gradient accumulation keeps the effective
batch the config asks for. On CPU nothing is capped (and the callback says so).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from efficia.errors import ConfigError


def plan_accumulation(batch_size: int, max_micro_batch: int) -> tuple[int, int]:
    """(micro_batch, accumulate) with micro_batch * accumulate == batch_size exactly and the largest
    micro_batch <= max_micro_batch that divides batch_size."""
    if batch_size < 1 or max_micro_batch < 1:
        raise ConfigError(f"batch sizes must be positive (batch_size={batch_size}, micro={max_micro_batch})")
    micro = min(batch_size, max_micro_batch)
    while batch_size % micro:
        micro -= 1
    return micro, batch_size // micro


def check_budget(memory_gb: float, headroom: float) -> None:
    """A preset's cap and the share of it kept free: a card has memory, and the headroom leaves some of it."""
    for key, value in (("memory_gb", memory_gb), ("headroom", headroom)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"callbacks.gpu_budget.{key}={value!r} is not a number")
    if memory_gb <= 0:
        raise ConfigError(f"callbacks.gpu_budget.memory_gb={memory_gb:g}: give the card's memory in GB, > 0")
    if not 0 <= headroom < 1:
        raise ConfigError(f"callbacks.gpu_budget.headroom={headroom:g}: give the share of the cap kept free as a "
                          "fraction in [0, 1) (the presets keep 0.1)")


def memory_fraction(budget_bytes: int, total_bytes: int) -> float:
    """Share of the card to allow so the process sees at most `budget_bytes` (all of it if smaller)."""
    return min(1.0, budget_bytes / total_bytes)


class GPUMemoryBudget(Callback):
    """`card` names the card the preset stands for (a key of efficia.training.throughput.GPU_PEAK_TFLOPS: the plan's
    step time, efficia/plan/choose.py)."""

    def __init__(self, memory_gb: float, headroom: float, card: str) -> None:
        check_budget(memory_gb, headroom)
        self.card = card
        self.budget = int(memory_gb * 2**30)
        self.headroom = headroom
        self.micro_batch: int | None = None
        self.accumulate: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            rank_zero_info(f"GPUMemoryBudget: no CUDA device ({device}); the {self.budget / 2**30:.0f} GB cap "
                           "and micro-batch search apply on GPUs only")
            return
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_fraction(self.budget, total), device)
        datamodule = trainer.datamodule
        batch_size, seq_len = datamodule.batch_size, datamodule.seq_len
        fits = self.largest_fitting_batch(trainer, pl_module, batch_size, seq_len)
        self.micro_batch, self.accumulate = plan_accumulation(batch_size, fits)
        datamodule.batch_size = self.micro_batch
        trainer.accumulate_grad_batches = self.accumulate
        rank_zero_info(f"GPUMemoryBudget: capped to {self.budget / 2**30:.0f} GB ({self.card}) of "
                       f"{total / 2**30:.0f} GB; "
                       f"micro-batch {self.micro_batch} x {self.accumulate} accumulation = batch {batch_size}")

    def largest_fitting_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch_size: int,
                              seq_len: int) -> int:
        vocab = pl_module.tokenizer.vocab_size
        # the configured optimizer's state exists for the whole run (AdamW: 2 moments, Adafactor: far less,
        # Muon: one momentum per hidden matrix), measured on the param groups the run will give it
        optimizer_bytes = optimizer_state_bytes(pl_module.cfg["optimizer"], pl_module.parameter_groups())

        def fits(micro_batch: int) -> bool:
            """One real forward + backward at this micro-batch, under the trainer's precision."""
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                idx = torch.randint(vocab, (micro_batch, seq_len + 1), device=pl_module.device)
                with trainer.precision_plugin.forward_context():
                    loss = pl_module.loss((idx[:, :-1], idx[:, 1:]))
                loss.backward()
                return torch.cuda.max_memory_allocated() + optimizer_bytes <= self.budget * (1 - self.headroom)
            except torch.cuda.OutOfMemoryError:
                return False
            finally:
                pl_module.zero_grad(set_to_none=True)

        found = search_micro_batch(batch_size, fits)
        if found is None:
            raise ConfigError(f"even a micro-batch of 1 x {seq_len} tokens does not fit in "
                              f"{self.budget / 2**30:.0f} GB; use a smaller scale= or data.seq_len=")
        return found


def say_where_ddp_runs(trainer: L.Trainer) -> None:
    """trainer=ddp asks for every GPU; without CUDA, Lightning runs one CPU process and says only "GPU available:
    False". One line says what runs instead, as the GPU presets do."""
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(trainer.strategy, DDPStrategy) and isinstance(trainer.accelerator, CPUAccelerator) \
            and trainer.world_size == 1:
        rank_zero_info("trainer=ddp: no CUDA device, so this is one process on the CPU (DDP with a world of 1); "
                       "trainer=ddp_cpu runs two CPU processes, trainer=cpu one without DDP")


def search_micro_batch(batch_size: int, fits: Callable[[int], bool]) -> int | None:
    """The largest of batch_size, batch_size/2, ... 1 for which `fits` holds (None if none does).
    Memory grows with the micro-batch, so the first that fits, from the top, is the largest."""
    candidate = batch_size
    while candidate >= 1:
        if fits(candidate):
            return candidate
        candidate //= 2
    return None


def optimizer_state_bytes(optimizer_cfg: dict[str, Any], params: Iterable[Any]) -> int:
    """Bytes of state the configured optimizer keeps for these parameters (tensors, or param groups as the run
    builds them: a group's flags, such as Muon's, decide which state a parameter gets), measured rather than
    assumed: one real step on a zero CPU copy of each distinct (shape, dtype, group flags), times its count."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    counts = Counter((tuple(p.shape), p.dtype, tuple(sorted((k, v) for k, v in g.items() if k != "params")))
                     for g in groups for p in g["params"] if p.requires_grad)
    total = 0
    for (shape, dtype, flags), n in counts.items():
        probe = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        probe.grad = torch.zeros_like(probe)
        optimizer = instantiate(optimizer_cfg, [{**dict(flags), "params": [probe]}])
        optimizer.step()
        state = optimizer.state[probe].values()
        total += n * sum(t.numel() * t.element_size() for t in state if torch.is_tensor(t) and t.dim() > 0)
    return total
