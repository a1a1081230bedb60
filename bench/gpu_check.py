"""Check the plan on a real card: each seed recipe trains 20 steps under its GPU preset, and its measured peak
memory, micro-batch, tokens/s and MFU are printed next to `python -m efficia.plan`'s prediction. It also checks
the CUDA-only paths the CPU suite cannot: FlexAttention's sliding window against the chunked path (forward and
backward, bf16) and bf16 autocast itself.

    python bench/gpu_check.py                       # every seed recipe, trainer=rtx3060 and rtx4090
    python bench/gpu_check.py --presets rtx3060 --steps 20 --recipes experiment=yinggem_shakespeare

Without CUDA it says so in one line and exits 0. Data: the recipes read their datasets as train.py does
(EFFICIA_DATA_DIR for tiny Shakespeare, EFFICIA_WIKIPEDIA_FILES or the hub for Wikipedia); a recipe whose data
is missing is reported and skipped. Nothing is checkpointed; logs go to a temporary folder.

The measured peak is torch.cuda.max_memory_allocated over the training steps, reset after the preset's own
micro-batch search and read before the final validation (a validation batch is not a training step).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efficia.errors import EfficiaError  # noqa: E402
from efficia.plan.choose import GIB, Plan, plan_run  # noqa: E402
from efficia.plan.command import compose  # noqa: E402
from efficia.plan.report import gib  # noqa: E402
from efficia.plan.report import rate as planned_rate  # noqa: E402
from efficia.plan.table import seed_recipes  # noqa: E402
from efficia.training.hardware import GPUMemoryBudget  # noqa: E402


class TrainingPeak(Callback):
    """Peak CUDA memory of the training steps only: reset once the preset has chosen its micro-batch (its
    search peaks too), read after every training batch (so the closing validation never counts)."""

    last: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        TrainingPeak.last = {"peak": None}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if torch.cuda.is_available():
            TrainingPeak.last["peak"] = torch.cuda.max_memory_allocated()
        budget = next((c for c in trainer.callbacks if isinstance(c, GPUMemoryBudget)), None)
        if budget is not None:
            TrainingPeak.last.update(micro_batch=budget.micro_batch, accumulate=budget.accumulate)


def run_overrides(recipe: list[str], preset: str, steps: int, val_batch_size: int) -> list[str]:
    """A short run of the recipe on the preset: `steps` optimizer steps, the closing validation only (two batches
    of the planned micro-batch, so validation fits where training does), no checkpoints, CSV logs."""
    return [*recipe, f"trainer={preset}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps + 1}",
            "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=5",
            f"data.val_batch_size={val_batch_size}", "logger=csv", "callbacks.checkpoint=null",
            "callbacks.loss_curve=null", "callbacks.early_stopping=null",
            "+callbacks.training_peak._target_=bench.gpu_check.TrainingPeak"]


def check_recipe(recipe: list[str], preset: str, steps: int, out: Path) -> dict[str, Any]:
    """Plan, then train: the two side by side (peak None without CUDA)."""
    from efficia.training.run import train

    plan = plan_run(compose([*recipe, f"trainer={preset}"]))
    micro = plan.configured.micro_batch or 1
    cfg = compose(run_overrides(recipe, preset, steps, micro), out)
    result = train(cfg)
    metrics = result["metrics"]
    return {"plan": plan, "steps": result["global_step"], "tok/s": metrics.get("tok/s"), "mfu": metrics.get("mfu"),
            **TrainingPeak.last}


def row(recipe: list[str], preset: str, found: dict[str, Any]) -> str:
    plan: Plan = found["plan"]
    c = plan.configured
    planned = f"{c.micro_batch} x {c.accumulate}" if c.micro_batch else "does not fit"
    ran = f"{found.get('micro_batch')} x {found.get('accumulate')}"
    peak = found.get("peak")
    ratio = f"{c.memory.peak / peak:.2f}" if peak else "-"
    rate = f"{found['tok/s']:,.0f}" if found.get("tok/s") else "-"
    mfu = f"{found['mfu']:.0%}" if found.get("mfu") else "-"
    return (f"| `{' '.join(recipe)}` | {preset} | {planned} | {ran} | {gib(c.memory.peak)} | "
            f"{gib(peak) if peak else '-'} | {ratio} | {planned_rate(plan.tokens_per_second(c))} | {rate} | {mfu} |")


def check_flex_attention() -> str:
    """FlexAttention's sliding window equals the chunked path (bf16, forward and backward), on this card."""
    from efficia.models.kernels import chunked_sliding_window_attention, flex_sliding_window_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grads = []
    for attend in (flex_sliding_window_attention, chunked_sliding_window_attention):
        out = attend(q, k, v, 512)
        out.float().square().sum().backward()
        grads.append((out.detach().float(), *(t.grad.float() for t in (q, k, v))))
        for t in (q, k, v):
            t.grad = None
    worst = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-6) for a, b in zip(*grads, strict=True))
    verdict = "ok" if worst < 5e-2 else "MISMATCH"
    return f"FlexAttention sliding window vs chunked SDPA (bf16, fwd+bwd): worst relative difference {worst:.1e}: " \
           + verdict


def check_bf16() -> str:
    """bf16 autocast runs a matmul in bf16 on this card (the presets' precision)."""
    supported = torch.cuda.is_bf16_supported()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = torch.randn(256, 256, device="cuda") @ torch.randn(256, 256, device="cuda")
    verdict = "ok" if y.dtype == torch.bfloat16 else "NOT bf16"
    return f"bf16: supported={supported}, autocast matmul dtype {y.dtype}: {verdict}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["rtx3060", "rtx4090"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--recipes", nargs="+", default=None,
                        help="recipes as space-joined overrides, e.g. 'model=gpt scale=seed' (default: every seed "
                             "recipe)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (run it where a GPU is)")
        return 0
    print(f"device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GIB:.0f} "
          f"GiB); the presets cap the process to their card's memory")
    print(check_bf16())
    print(check_flex_attention())
    recipes = [r.split() for r in args.recipes] if args.recipes else seed_recipes()
    lines = ["| recipe | preset | plan micro x accum | ran | plan peak | measured peak | plan / measured | "
             "plan tok/s | measured tok/s | MFU |", "|" + "---|" * 10]
    print("\n".join(lines), flush=True)
    for recipe in recipes:
        for preset in args.presets:
            with tempfile.TemporaryDirectory(prefix="gpu-check-") as out:
                try:
                    found = check_recipe(recipe, preset, args.steps, Path(out) / "run")
                except (EfficiaError, torch.cuda.OutOfMemoryError) as err:
                    line = f"| `{' '.join(recipe)}` | {preset} | error: {str(err).splitlines()[0]} |"
                else:
                    line = row(recipe, preset, found)
            lines.append(line)
            print(line, flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
