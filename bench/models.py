"""Benchmark every registered architecture on the axes that matter for efficient LMs, side by side in one run.

    python bench/models.py scaling                       # fwd+bwd time and peak memory vs T, every model
    python bench/models.py ratio --seq-lens 8192 --repeats 5 --threads 1  # fwd+bwd time vs the first, interleaved
    python bench/models.py cache                         # cache_bytes per token at T = 1024 and 8192 (seed sizes)
    python bench/models.py decode                        # decode tokens/s with the cache vs without, prefill time
    python bench/models.py train                         # training tokens/s and MFU through the real Lightning loop
    python bench/models.py scaling "model=gpt" "model=yinggem model.window=64" --seq-lens 512 1024

A run spec is one model's Hydra overrides (default: every registered model); each is composed from conf/
exactly as train.py would (`--scale`, default small, plus `model.max_seq_len` large enough for the case).
Results are printed as a Markdown table and written to bench/results/models-<axis>.json and .csv (scaling
also draws models-scaling.png).

Memory (scaling): each (spec, T) runs in a fresh subprocess. On Linux the peak-RSS counter (VmHWM) is reset
through /proc/self/clear_refs just before the measured pass and the peak is reported above the RSS at that
moment (model, optimizer-free: the pass's activations and gradients); children use a fixed glibc mmap
threshold so freed tensors leave the resident set. On CUDA: max_memory_allocated above the allocation before.
Time is measured in another fresh process with glibc's default allocator, as training runs (under the fixed
threshold every large allocation faults its pages in again: +6% CPU time for gpt at T=8192, +20% for
efficientlm, +71% for yinggem): the median of `--repeats` passes after two warm-up passes, as wall time and as
the process's CPU time (with `--threads 1` the CPU time is the fair clock on a shared machine: what the pass
computed, not what it waited).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import add_device_args, peak_bytes_of, run_child  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def build(spec: str, scale: str, max_seq_len: int, vocab_size: int, device: str = "cpu"):
    """The model a run spec names, composed from conf/ like train.py, with room for max_seq_len tokens."""
    import torch
    from omegaconf import OmegaConf

    from efficia.build import build_model
    from efficia.config import compose_run

    cfg = compose_run([f"scale={scale}", *spec.split(), f"model.max_seq_len={max_seq_len}", "model.dropout=0.0"],
                      ROOT / "outputs" / "bench")
    torch.manual_seed(0)
    with torch.device(device):
        return build_model(OmegaConf.to_container(cfg.model, resolve=True), vocab_size)


def scaling_child(job: dict) -> dict:
    """One forward+backward measurement of one model at one length, in this (fresh) process."""
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    model = build(job["spec"], job["scale"], job["T"], job["vocab"]).to(device).train()
    idx = torch.randint(job["vocab"], (job["batch"], job["T"]), device=device)

    def step() -> None:
        model(idx).float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    model(idx[:, : min(job["T"], 64)]).sum().backward()  # kernels, thread pools, autograd start-up
    model.zero_grad(set_to_none=True)
    info = {"params": model.num_params(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if job["part"] == "memory":
        peak, method = peak_bytes_of(step, device)
        return {"peak_bytes": peak, "method": method, **info}
    step()  # a full-length warm-up pass: the allocator's caches, as in training
    times, cpu = [], []
    for _ in range(job["repeats"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"median_s": statistics.median(times), "median_cpu_s": statistics.median(cpu), **info}


def scaling(specs: list[str], args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    seq_lens = args.seq_lens or [512, 1024, 2048, 4096, 8192]
    records, lines = [], []
    for spec in specs:
        per_token = {}
        for T in seq_lens:
            job = dict(spec=spec, scale=args.scale, T=T, vocab=args.vocab, batch=args.batch, repeats=args.repeats,
                       device=args.device, threads=args.threads)
            # memory under a fixed mmap threshold (resident memory follows live tensors), time without it
            # (that threshold makes every large allocation fault its pages in again; training never runs so)
            res = {**job, **run_child(__file__, {**job, "part": "memory"}),
                   **run_child(__file__, {**job, "part": "time"}, fixed_mmap=False)}
            records.append(res)
            if "error" in res:
                lines.append(f"| `{spec}` | {T} | failed: {res['error'][:80]} | | | | |")
                continue
            per_token[T] = res["median_s"] / T
            growth = per_token[T] / per_token[seq_lens[0]]
            lines.append(f"| `{spec}` | {T} | {res['median_s'] * 1e3:.1f} | {per_token[T] * 1e6:.1f} | "
                         f"{res['median_cpu_s'] / T * 1e6:.1f} | {growth:.2f}x | {res['peak_bytes'] / 2**20:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    info = next((r for r in records if "method" in r), {})
    header = [f"forward+backward, batch {args.batch}, scale={args.scale}, fp32, device={args.device}, "
              f"torch {info.get('torch')}, {info.get('threads')} threads, median of {args.repeats}; "
              f"memory: {info.get('method')}", "",
              f"| run | T | ms | µs/token | CPU µs/token | µs/token vs T={seq_lens[0]} | peak MiB |",
              "|---|---|---|---|---|---|---|"]
    return header + lines, records


def ratio(specs: list[str], args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """forward+backward time against the first run, robust to a drifting machine: every model is built in this
    one process and the models are timed in turn, `--repeats` rounds; each round's ratios share the machine's
    state of that minute, and the table gives their median (time per model: its median CPU time)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    records, lines = [], []
    for T in args.seq_lens or [8192]:
        models = [build(spec, args.scale, T, args.vocab).train() for spec in specs]
        idx = torch.randint(args.vocab, (args.batch, T))

        def step(model, idx=idx) -> float:
            start = time.process_time()
            model(idx).float().logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)
            return time.process_time() - start

        for model in models:  # warm-up: kernels, thread pools, the allocator's caches
            step(model)
        rounds = [[step(model) for model in models] for _ in range(args.repeats)]
        for i, spec in enumerate(specs):
            ratios = [r[i] / r[0] for r in rounds]
            row = {"spec": spec, "T": T, "median_cpu_s": statistics.median(r[i] for r in rounds),
                   "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
            records.append(row)
            lines.append(f"| `{spec}` | {T} | {row['median_cpu_s'] / T * 1e6:.1f} | {row['ratio_median']:.2f}x | "
                         f"{row['ratio_min']:.2f}x - {row['ratio_max']:.2f}x |")
            print(lines[-1], file=sys.stderr, flush=True)
        del models
    header = [f"forward+backward CPU time, batch {args.batch}, scale={args.scale}, fp32, {torch.get_num_threads()} "
              f"threads, the models in turn for {args.repeats} rounds in one process; ratio to `{specs[0]}` per round",
              "", "| run | T | CPU µs/token (median) | ratio (median) | ratio (range) |", "|---|---|---|---|---|"]
    return header + lines, records


def cache(specs: list[str], args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """cache_bytes per token for one sequence, built on the meta device (no memory, any size)."""
    records, lines, reference = [], [], None
    for spec in specs:
        model = build(spec, args.scale, 8192, args.vocab, device="meta")
        row = {"spec": spec, "params": model.num_params(),
               **{f"bytes_per_token_{T}": model.cache_bytes(T) / T for T in (1024, 8192)}}
        reference = reference or row
        records.append(row)
        lines.append(f"| `{spec}` | {row['params'] / 1e6:.1f}M | {row['bytes_per_token_1024']:,.0f} | "
                     f"{row['bytes_per_token_8192']:,.0f} | "
                     f"{row['bytes_per_token_1024'] / reference['bytes_per_token_1024']:.3f} | "
                     f"{row['bytes_per_token_8192'] / reference['bytes_per_token_8192']:.3f} |")
    header = [f"decoding cache per sequence, scale={args.scale}, parameter dtype fp32, vocab {args.vocab}; "
              f"ratios against the first run", "",
              "| run | params | bytes/token @1024 | bytes/token @8192 | ratio @1024 | ratio @8192 |",
              "|---|---|---|---|---|---|"]
    return header + lines, records


def decode(specs: list[str], args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """Greedy decoding of `--new` tokens after a `--prompt`-token prompt: through the model's cache, and
    without one (a full forward over the whole context for every token)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    records, lines = [], []
    total = args.prompt + args.new
    for spec in specs:
        model = build(spec, args.scale, total, args.vocab).eval()
        prompt = torch.randint(args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            model(prompt[:, :8])  # warm-up
            start = time.perf_counter()
            cache_ = model.new_cache(1)
            logits = model(prompt, cache=cache_)[:, -1]
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.new):
                logits = model(logits.argmax(-1, keepdim=True), cache=cache_)[:, -1]
            cached = args.new / (time.perf_counter() - start)
            context = prompt
            start = time.perf_counter()
            for _ in range(args.new):
                token = model(context)[:, -1].argmax(-1, keepdim=True)
                context = torch.cat((context, token), dim=1)
            uncached = args.new / (time.perf_counter() - start)
        row = {"spec": spec, "prefill_ms": prefill * 1e3, "cached_tok_s": cached, "uncached_tok_s": uncached,
               "cache_bytes": model.cache_bytes(total)}
        records.append(row)
        lines.append(f"| `{spec}` | {row['prefill_ms']:.1f} | {cached:,.0f} | {uncached:,.0f} | "
                     f"{cached / uncached:.1f}x | {row['cache_bytes'] / 2**10:,.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    header = [f"batch 1, scale={args.scale}, prompt {args.prompt} tokens, {args.new} new tokens (greedy), fp32, "
              f"{torch.get_num_threads()} threads", "",
              f"| run | prefill ms ({args.prompt} tokens) | decode tok/s, cached | decode tok/s, no cache | "
              f"speed-up | cache KiB @{total} |", "|---|---|---|---|---|---|"]
    return header + lines, records


def train(specs: list[str], args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """`--steps` real training steps per model (efficia.training.run.train, default callbacks, no validation
    or checkpoints), tokens/s from batch end to batch end, MFU against this CPU's fp32 matmul peak
    measured before and after, and FLOPs per token counted for each model (not 6N)."""
    import torch
    from omegaconf import OmegaConf

    from bench.overhead import lightning_loop
    from efficia.config import compose_run
    from efficia.training.throughput import measure_cpu_peak, training_flops_per_token

    if args.threads:
        torch.set_num_threads(args.threads)
    peaks, records = [measure_cpu_peak()], []
    for spec in specs:
        overrides = [f"scale={args.scale}", *spec.split()]
        cfg = compose_run(overrides, ROOT / "outputs" / "bench")
        flops = training_flops_per_token(OmegaConf.to_container(cfg.model, resolve=True), args.vocab,
                                         cfg.data.seq_len)
        with tempfile.TemporaryDirectory() as tmp:  # a fresh run folder each time (a used one is refused)
            rate = lightning_loop(overrides, args.steps, Path(tmp) / "run")
        peaks.append(measure_cpu_peak())
        records.append({"spec": spec, "tokens_per_s": rate, "flops_per_token": flops})
    peak = statistics.median(peaks)
    reference = records[0]["tokens_per_s"]
    lines = []
    for row in records:
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
        lines.append(f"| `{row['spec']}` | {row['flops_per_token'] / 1e6:.2f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['tokens_per_s'] / reference:.2f}x | {row['mfu']:.0%} |")
    header = [f"training through the Lightning loop, scale={args.scale}, {args.steps} steps, fp32, "
              f"{torch.get_num_threads()} threads, fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (median of "
              f"{len(peaks)} measurements in this run)", "",
              "| run | MFLOP/token (fwd+bwd, counted) | tokens/s | vs first | MFU |", "|---|---|---|---|---|"]
    return header + lines, records


def plot_scaling(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in dict.fromkeys(r["spec"] for r in records):
        rows = [r for r in records if r["spec"] == spec and "error" not in r]
        lengths = [r["T"] for r in rows]
        time_ax.plot(lengths, [r["median_s"] / r["T"] * 1e6 for r in rows], "o-", label=spec)
        mem_ax.plot(lengths, [r["peak_bytes"] / 2**20 for r in rows], "o-", label=spec)
    for ax, label in ((time_ax, "forward+backward µs per token"), (mem_ax, "peak memory MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    mem_ax.set_yscale("log")
    time_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_csv(records: list[dict], out: Path) -> None:
    import csv

    keys = list(dict.fromkeys(k for r in records for k in r))
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)


AXES = {"scaling": scaling, "ratio": ratio, "cache": cache, "decode": decode, "train": train}
DEFAULT_SCALE = {"scaling": "small", "ratio": "small", "cache": "seed", "decode": "small", "train": "small"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("axis", choices=sorted(AXES), nargs="?")
    parser.add_argument("specs", nargs="*", help="run specs (overrides); default: model=<each registered model>")
    parser.add_argument("--scale", default=None, help="scale= for every run (default: small; cache: seed)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 65 chars; cache 50257)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--steps", type=int, default=150, help="training steps per model (train)")
    add_device_args(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(scaling_child(json.loads(args.child))))
        return
    if args.axis is None:
        parser.error("name an axis: " + ", ".join(sorted(AXES)))
    from efficia.models import MODELS

    args.scale = args.scale or DEFAULT_SCALE[args.axis]
    args.vocab = args.vocab or (50257 if args.axis == "cache" else 65)
    specs = args.specs or [f"model={name}" for name in sorted(MODELS, key=lambda n: (n != "gpt", n))]
    lines, records = AXES[args.axis](specs, args)
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"models-{args.axis}.json"
    out.write_text(json.dumps({"argv": sys.argv[1:], "table": lines, "records": records}, indent=1))
    write_csv(records, out.with_suffix(".csv"))
    if args.axis == "scaling":
        plot_scaling(records, out.with_suffix(".png"))
    print(f"\nwritten: {out.relative_to(ROOT)} (+ .csv{', .png' if args.axis == 'scaling' else ''})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
