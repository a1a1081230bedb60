"""Training throughput and MFU of a model through the real Lightning loop, next to this machine's
measured fp32 matmul peak (so the MFU is a ratio of two numbers taken in the same run).

    python bench/train_speed.py                      # gpt at scale=small (nanoGPT's CPU recipe)
    python bench/train_speed.py model=yinggem model.window=32 steps=200

FLOPs per token: 6N + 12·L·d·T (weights + attention, PaLM appendix B), as nanoGPT's estimate_mfu.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficia.config import compose_run  # noqa: E402
from efficia.training import train  # noqa: E402


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
    steps = next((int(a.split("=")[1]) for a in argv if a.startswith("steps=")), 300)
    overrides = [a for a in argv if not a.startswith("steps=")]
    out = Path("bench/results/train_speed")
    cfg = compose_run(["logger=csv", f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
                         "callbacks.early_stopping=null", "callbacks.checkpoint=null", "callbacks.progress_bar=null",
                         "callbacks.loss_curve=null", "+trainer.enable_progress_bar=false", *overrides], out)
    peak_before = matmul_peak()
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    peak = (peak_before + matmul_peak()) / 2
    m = cfg.model
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = 6 * result["params"] + 12 * m.n_layer * m.d_model * cfg.data.seq_len
    tok_s = steps * tokens_per_step / seconds
    print(f"\n| model | params | steps | wall s | ms/step | tokens/s | matmul peak GFLOP/s | MFU |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| {m.name} | {result['params'] / 1e6:.2f}M | {steps} | {seconds:.1f} | {1000 * seconds / steps:.1f} | "
          f"{tok_s:,.0f} | {peak / 1e9:.0f} | {tok_s * flops_per_token / peak:.0%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
