"""Time to nanoGPT's loss: nanoGPT's recipe and `python train.py` timed one after the other in one run, on
characters or on GPT-2 tokens.

Each is launched as a user would (a fresh process, start-up included). nanoGPT's time ends with its last
training iteration; efficia's clock reads each validation's time from the run record (start-up, earlier
validations and checkpoints included), so the comparison leans against efficia. The target is nanoGPT's own
final loss in the same pair, both scored on the whole validation split in non-overlapping 64-token windows.
Reported: nanoGPT's wall time, the time efficia's first validation at or below that loss was done (its
"time to loss"), the ratio of the two, and both final losses.

    python bench/learning_speed.py --repeats 3                                      # characters, the default run
    python bench/learning_speed.py --repeats 3 -- optimizer=muon optimizer.lr=1e-2 trainer.max_steps=300
    python bench/learning_speed.py --tokens gpt2 --iters 300 -- optimizer=muon ...  # GPT-2 tokens, Wikipedia

Characters: nanoGPT's README CPU recipe (bench/nanogpt.py: 2001 iterations of 12 x 64 on tiny Shakespeare).
GPT-2 tokens: the same recipe on the Wikipedia sample's tokens at 24 x 64 for --iters iterations (its cosine
decays over them; train.bin / val.bin made from the DataModule's own split, as bench/bpe_speed.py), against
`python train.py data=wikipedia scale=small data.batch_size=24 ...` (gpt: 4 layers, d 128, 50,257 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bpe_speed import NANOGPT_VOCAB, make_bins, wiki_files  # noqa: E402
from efficia.config import compose_run  # noqa: E402

NANOGPT_CHAR_ITERS = 2000  # the README recipe: iterations 0..2000


def shakespeare_text() -> Path:
    data_dir = os.environ.get("EFFICIA_DATA_DIR")
    for candidate in ([Path(data_dir) / "tinyshakespeare" / "input.txt"] if data_dir else []) + [
            Path.home() / ".cache" / "efficia" / "tinyshakespeare" / "input.txt"]:
        if candidate.is_file():
            return candidate
    sys.exit("tiny Shakespeare not found: set EFFICIA_DATA_DIR (or run `python train.py` once to download it)")


def base_overrides(tokens: str) -> list[str]:
    """What makes `python train.py` train on the nanoGPT side's tokens; the user's overrides go after."""
    if tokens == "char":
        return []
    return ["data=wikipedia", "scale=small", "data.batch_size=24", f"data.files={wiki_files()}",
            "trainer.num_sanity_val_steps=0"]


def nanogpt_args(tokens: str, work: Path, iters: int) -> list[str]:
    if tokens == "char":
        return ["--text", str(shakespeare_text())]
    bins = work / "bins"
    if not bins.exists():
        make_bins(compose_run(base_overrides(tokens), work / "cfg"), bins)
    return ["--bins", str(bins), "--vocab", str(NANOGPT_VOCAB), "--batch", "24", "--iters", str(iters)]


def run_nanogpt(work: Path, tokens: str, iters: int) -> dict:
    args = nanogpt_args(tokens, work, iters)
    launch = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "nanogpt.py"), *args, "--out", str(work / "nanogpt")],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"run": "nanoGPT recipe (bench/nanogpt.py)", "wall_s": result["train_end"] - launch,
            "final_val": result["val_whole"], "tokens": result["tokens"]}


def run_efficia(work: Path, overrides: list[str], target: float) -> dict:
    out = work / f"efficia-{time.time_ns()}"
    launch = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out}", *overrides],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - launch
    if proc.returncode:
        sys.exit(f"python train.py {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    record = json.loads((out / "run_record.json").read_text())
    reached = [(v["time"] - launch, v["step"]) for v in record["val"] if v["loss"] <= target]
    return {"run": f"python train.py {' '.join(overrides)}".strip(), "wall_s": wall,
            "final_val": record["final_val_loss"], "target": target,
            "reach_s": reached[0][0] if reached else None, "reach_step": reached[0][1] if reached else None,
            "steps": record["steps"], "tokens": record["tokens"], "train_tokens_per_s": record["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", choices=["char", "gpt2"], default="char",
                        help="char: tiny Shakespeare (nanoGPT's README recipe); gpt2: Wikipedia sample, GPT-2 tokens")
    parser.add_argument("--iters", type=int, default=None,
                        help="nanoGPT's iterations with --tokens gpt2 (its schedule decays over them); default 300")
    parser.add_argument("--repeats", type=int, default=1, help="pairs to run (nanoGPT, then efficia); medians reported")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/...)")
    parser.add_argument("overrides", nargs="*", help="overrides for `python train.py`")
    args = parser.parse_args()
    if args.tokens == "char" and args.iters is not None:
        parser.error("--iters is for --tokens gpt2; on characters nanoGPT runs its README recipe (2001 iterations)")
    iters = NANOGPT_CHAR_ITERS if args.tokens == "char" else (args.iters or 300)
    out = args.out or ROOT / "bench" / "results" / f"learning_speed_{args.tokens}.json"
    overrides = base_overrides(args.tokens) + args.overrides
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            # nanoGPT first in every pair: its final loss is efficia's target in the pair
            nano = run_nanogpt(Path(tmp), args.tokens, iters)
            runs.append({"pair": i, **nano})
            print(json.dumps(runs[-1]), flush=True)
            runs.append({"pair": i, **run_efficia(Path(tmp), overrides, nano["final_val"])})
            print(json.dumps(runs[-1]), flush=True)
    nano = [r for r in runs if r["run"].startswith("nanoGPT")]
    ours = [r for r in runs if not r["run"].startswith("nanoGPT")]
    nano_wall = statistics.median(r["wall_s"] for r in nano)
    reached = all(r["reach_s"] is not None for r in ours)
    reach_ratio = statistics.median(r["reach_s"] / n["wall_s"] for r, n in zip(ours, nano, strict=True)) \
        if reached else None
    summary = {"tokens": args.tokens, "nanogpt_iters": iters + 1, "nanogpt_wall_s": nano_wall,
               "nanogpt_final_val": statistics.median(r["final_val"] for r in nano),
               "efficia_wall_s": statistics.median(r["wall_s"] for r in ours),
               "efficia_final_val": statistics.median(r["final_val"] for r in ours),
               "efficia_reach_s": statistics.median(r["reach_s"] for r in ours) if reached else None,
               "reach_ratio": reach_ratio}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    reach = f"{summary['efficia_reach_s']:.1f}" if reached else "not reached in every pair"
    print(f"\n{args.tokens} tokens, medians of {args.repeats} pair(s); efficia's base: {base_overrides(args.tokens)}\n"
          "| run | wall s | whole-split val loss | time to nanoGPT's loss, s | vs nanoGPT's wall |\n"
          "|---|---|---|---|---|\n"
          f"| nanoGPT recipe ({iters + 1} iterations) | {nano_wall:.1f} | {summary['nanogpt_final_val']:.4f} | "
          f"{nano_wall:.1f} | 1.00x |\n"
          f"| `python train.py {' '.join(args.overrides)}` | {summary['efficia_wall_s']:.1f} | "
          f"{summary['efficia_final_val']:.4f} | {reach} | "
          + (f"**{reach_ratio:.2f}x** |" if reached else "- |") + f"\n\n({out})")


if __name__ == "__main__":
    main()
