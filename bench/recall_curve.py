"""Answer accuracy against steps, wall time and process CPU time, from runs' run_record.json (experiment=recall).

    python bench/recall_curve.py <run dir> [<run dir> ...] --out docs/recall_gpt.png

On a shared machine the wall clock depends on the neighbours; the process's CPU seconds (all its threads) are
what the run itself used, so both are plotted. Prints one line per validation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for run in args.runs:
        record = json.loads((run / "run_record.json").read_text())
        val = [v for v in record["val"] if "recall" in v]
        for v in val:
            per_set = " ".join(f"{k} {a:.3f}" for k, a in v["recall"].items())
            print(f"{run.name}: step {v['step']} tokens {v['tokens']:,.0f} wall {v['wall_s']:.0f}s "
                  f"cpu {v.get('cpu_s', float('nan')):.0f}s loss {v['loss']:.3f} | {per_set}")
        for name in val[0]["recall"] if val else []:
            label = f"{record['model']} {run.name}: {name}"
            for ax, key in zip(axes, ("step", "wall_s", "cpu_s"), strict=True):
                ax.plot([v.get(key, float("nan")) for v in val], [v["recall"][name] for v in val], "o-",
                        markersize=3, label=label)
    for ax, xlabel in zip(axes, ("step", "wall time (s, shared machine)", "process CPU time (s)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.axhline(0.99, color="grey", linewidth=0.8, linestyle="--")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("answer accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
