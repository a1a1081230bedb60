"""Train several models on the same data for the same number of steps, one after another in one
process, and print their validation figures side by side.

    python bench/compare_models.py "model=gpt" "model=yinggem model.window=32"
    python bench/compare_models.py --common "scale=small trainer.max_steps=2000" "model=gpt" ...

Each positional argument is one run's overrides (space separated); --common is added to every run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficia.config import compose_run  # noqa: E402
from efficia.training.run import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="one run's overrides, e.g. 'model=yinggem model.window=32'")
    parser.add_argument("--common", default="logger=csv", help="overrides added to every run")
    parser.add_argument("--out", default="bench/results/compare_models")
    args = parser.parse_args()
    rows = []
    for i, run in enumerate(args.runs):
        cfg = compose_run([*args.common.split(), *run.split()], Path(args.out) / str(i))
        start = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - start
        m = result["metrics"]
        tokens = result["global_step"] * cfg.data.batch_size * cfg.data.seq_len
        rows.append(f"| `{run}` | {result['params'] / 1e6:.3f}M | {result['global_step']} | {m['val/loss']:.4f} | "
                    f"{m['val/bpb']:.4f} | {seconds:.0f} | {tokens / seconds:,.0f} |")
    print(f"\ncommon overrides: `{args.common}`\n")
    print("| run | params | steps | val loss | val bpb | wall s | train tokens/s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
