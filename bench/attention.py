"""Benchmark: YingGem's sliding-window attention against full causal SDPA, forward + backward.

    python bench/attention.py            # T = 1024, 2048, 4096, 8192, window 512
    python bench/attention.py --quick    # small sizes, a few seconds

Each (T, implementation) runs in a fresh subprocess so that memory is measured, not computed:
- CPU: the kernel's peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs just before
  the first forward+backward, and the peak is reported above the RSS at that moment (inputs
  already allocated, so the figure is the attention's own intermediates, outputs and gradients).
  Children run with a fixed glibc mmap threshold so freed tensors leave the resident set.
  Where the counter cannot be reset, `resource.getrusage(RUSAGE_SELF).ru_maxrss` is used instead
  (an upper bound that also counts the interpreter's start-up peak; the table says which).
- CUDA: `torch.cuda.max_memory_allocated()` above the allocation before the run.
Time is the median of `--repeats` forward+backward passes after that first (warm-up) pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import add_device_args, peak_bytes_of, run_child  # noqa: E402


def child(spec: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    import torch
    import torch.nn.functional as F

    from efficia.models.kernels import sliding_window_attention

    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    shape = (spec["B"], spec["H"], spec["T"], spec["D"])
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device=device)
    if spec["impl"] == "sliding":
        fn = lambda: sliding_window_attention(q, k, v, spec["window"])
    else:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def step() -> None:
        torch.autograd.grad(fn(), (q, k, v), grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize()

    # a tiny pass first: kernels, thread pools and autograd start-up are not the attention's memory
    small = [t[..., : min(spec["T"], 2 * spec["window"] + 3), :].detach().requires_grad_() for t in (q, k, v)]
    ones = torch.ones_like(small[0])
    torch.autograd.grad(sliding_window_attention(*small, spec["window"]), small, ones)
    torch.autograd.grad(F.scaled_dot_product_attention(*small, is_causal=True), small, ones)
    del small, ones
    peak, method = peak_bytes_of(step, device)  # the first full-size pass, measured
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "peak_bytes": peak, "method": method,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def run_config(spec: dict) -> dict:
    result = run_child(__file__, spec)
    if "error" in result:
        raise RuntimeError(f"benchmark child failed for {spec}: {result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (T 256..1024, window 64)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    add_device_args(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    seq_lens = args.seq_lens or ([256, 512, 1024] if args.quick else [1024, 2048, 4096, 8192])
    window = args.window or (64 if args.quick else 512)
    repeats = args.repeats or (2 if args.quick else 3)
    base = dict(B=args.batch, H=args.heads, D=args.head_dim, window=window, repeats=repeats,
                device=args.device, threads=args.threads)
    rows, info = [], None
    for T in seq_lens:
        res = {impl: run_config({**base, "impl": impl, "T": T}) for impl in ("sliding", "full")}
        info = res["full"]
        s, f = res["sliding"], res["full"]
        rows.append(f"| {T} | {window} | {s['median_s'] * 1e3:.1f} | {f['median_s'] * 1e3:.1f} | "
                    f"{f['median_s'] / s['median_s']:.2f}x | {s['peak_bytes'] / 2**20:.1f} | "
                    f"{f['peak_bytes'] / 2**20:.1f} | {f['peak_bytes'] / max(s['peak_bytes'], 1):.2f}x |")
        print(rows[-1], file=sys.stderr, flush=True)  # progress
    print(f"sliding-window attention (yinggem) vs full causal SDPA, forward+backward, fp32, "
          f"B={args.batch} H={args.heads} D={args.head_dim}, device={args.device}, "
          f"torch {info['torch']}, {info['threads']} threads, median of {repeats}; "
          f"memory: {info['method']}\n")
    print("| T | window | sliding ms | full causal ms | full/sliding time | sliding peak MiB "
          "| full peak MiB | full/sliding memory |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
