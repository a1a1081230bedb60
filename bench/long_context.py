"""Long context, every architecture side by side: `experiment=compare_long`, one fresh process per model.

    python bench/long_context.py                          # equal wall clock: 3 minutes of training per model
    python bench/long_context.py --budget 00:00:05:00     # another budget (DD:HH:MM:SS)
    python bench/long_context.py --steps 300              # equal tokens instead (max_steps x batch x seq_len)
    python bench/long_context.py "model=gpt" "model=yinggem model.window=256"   # chosen runs
    python bench/long_context.py --report bench/results/long-context.json       # redraw from a saved run

Each run is `python train.py experiment=compare_long hydra.mode=RUN <its overrides>` in its own process
(Wikipedia bytes at 1024 tokens, scale=small, the same documents and seed), so its peak resident memory is
its own (read from the kernel when the process ends). From each run's `run_record.json`: val bits per byte
against wall time and tokens, training tokens/s, and decoding-cache bytes. Then, in this process, decode
speed through the cache after a 1024- and an 8192-token prompt, on a model of the same shape with its context
raised to hold the prompt (speed does not depend on the weights). Runs are interleaved with nothing else, one
after another; the report (Markdown, JSON and a plot) goes to bench/results/long-context.*.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import build  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DECODE_PROMPTS = (1024, 8192)
BYTE_VOCAB = 257  # tokenizer=byte: 256 bytes + end of text


def registered_models() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))


def train_run(spec: str, out: Path, args: argparse.Namespace) -> dict:
    """One training run in a fresh process; its record plus the process's peak RSS."""
    budget = ([f"trainer.max_time={args.budget}"] if args.steps is None
              else ["trainer.max_time=null", f"trainer.max_steps={args.steps}"])
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=compare_long", "hydra.mode=RUN",
           f"hydra.run.dir={out}", "logger=csv", *budget, *args.common.split(), *spec.split()]
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed below, after the child exits
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    log.close()
    seconds = time.perf_counter() - start
    record_path = out / "run_record.json"
    if os.waitstatus_to_exitcode(status) != 0 or not record_path.is_file():
        tail = out.with_suffix(".log").read_text().strip().splitlines()[-1:] or ["no output"]
        return {"spec": spec, "error": tail[0]}
    record = json.loads(record_path.read_text())
    return {"spec": spec, "process_s": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, **record}


def decode_speed(spec: str, prompt_len: int, new: int, threads: int) -> float:
    """Greedy tokens/s through the cache after a `prompt_len`-token prompt (prefill not counted)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = build(spec, "small", prompt_len + new + 4, BYTE_VOCAB).eval()
    prompt = torch.randint(BYTE_VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.new_cache(1)
        logits = model(prompt, cache=cache)[:, -1]
        for _ in range(4):  # warm-up: the first steps after a prefill allocate
            logits = model(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
        start = time.perf_counter()
        for _ in range(new):
            logits = model(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
        return new / (time.perf_counter() - start)


def table(rows: list[dict], mode: str) -> list[str]:
    done = [r for r in rows if "error" not in r]
    lines = [f"{mode}; Wikipedia bytes (tokenizer=byte), seq_len 1024, scale=small, one process per model.", "",
             "| model | params (M) | steps | tokens (M) | final val bpb | best val bpb | train tokens/s | "
             "peak RSS MiB | decode tok/s @1024 | decode tok/s @8192 | cache KiB @1024 | cache KiB @8192 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(done, key=lambda r: r["final_val_bpb"]):
        lines.append(
            f"| `{r['spec']}` | {r['params'] / 1e6:.3f} | {r['steps']} | {r['tokens'] / 1e6:.3f} | "
            f"{r['final_val_bpb']:.4f} | {r['best_val_bpb']:.4f} | {r['tokens_per_s']:,.0f} | "
            f"{r['peak_rss_bytes'] / 2**20:,.0f} | {r['decode_tok_s@1024']:,.0f} | {r['decode_tok_s@8192']:,.0f} | "
            f"{r['cache_bytes@1024'] / 1024:,.0f} | {r['cache_bytes@8192'] / 1024:,.0f} |")
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['spec']}` | failed: {r['error']} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in rows:
        if "error" in r or not r.get("val"):
            continue
        for ax, key, scale in ((axes[0], "wall_s", 1.0), (axes[1], "tokens", 1e6)):
            ax.plot([v[key] / scale for v in r["val"]], [v["bpb"] for v in r["val"]], "o-", markersize=3,
                    label=r["spec"])
    axes[0].set_xlabel("wall time (s, validation included)")
    axes[1].set_xlabel("training tokens (M)")
    axes[0].set_ylabel("val bits per byte")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="one run's overrides each (default: every model in conf/model/)")
    parser.add_argument("--budget", default="00:00:03:00", help="trainer.max_time per model (DD:HH:MM:SS)")
    parser.add_argument("--steps", type=int, default=None, help="equal tokens: max_steps per model, no time limit")
    parser.add_argument("--common", default="", help="overrides added to every run")
    parser.add_argument("--new", type=int, default=32, help="decoded tokens per decode measurement")
    parser.add_argument("--threads", type=int, default=0, help="decode threads (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "long_context"))
    parser.add_argument("--report", help="redraw the report from a saved long-context JSON")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        rows, mode = saved["rows"], saved["mode"]
    else:
        mode = (f"equal wall clock: trainer.max_time={args.budget} per model" if args.steps is None
                else f"equal tokens: {args.steps} steps x 8 x 1024 per model")
        out = Path(args.out) / time.strftime("%Y-%m-%d_%H-%M-%S")
        out.mkdir(parents=True)
        rows = []
        for spec in args.runs or [f"model={m}" for m in registered_models()]:
            row = train_run(spec, out / spec.replace(" ", "_").replace("=", "-"), args)
            if "error" not in row:
                for n in DECODE_PROMPTS:
                    row[f"decode_tok_s@{n}"] = decode_speed(spec, n, args.new, args.threads)
            rows.append(row)
            print(table([row], mode)[-1], file=sys.stderr, flush=True)
        (RESULTS / "long-context.json").write_text(json.dumps({"mode": mode, "rows": rows}, indent=1))
    plot(rows, RESULTS / "long-context.png")
    text = "\n".join(table(rows, mode))
    (RESULTS / "long-context.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
