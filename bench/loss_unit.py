"""The output layer + loss alone (efficia/models/output.py): time and peak memory of forward + backward of
hidden[B*T, C] @ weight[V, C].T -> cross-entropy, plain against fused at several chunk sizes.

Times: one process, the cases alternating round by round (median per case). Memory: each case once in a fresh
process (bench/measure.py), peak RSS above what was resident before the step. "fused-recompute" is the fused
path with reduction="none" (gradients recomputed per chunk in backward) followed by .mean().

    python bench/loss_unit.py                          # GPT-2 vocabulary, 24 x 64 tokens, d 128
    python bench/loss_unit.py --vocab 65 --chunks 256 1536
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import add_device_args, peak_bytes_of, run_child  # noqa: E402
from efficia.models.output import linear_cross_entropy  # noqa: E402


def make_step(case: str, tokens: int, d: int, vocab: int, dtype: str):
    torch.manual_seed(0)
    hidden = torch.randn(tokens, d, requires_grad=True)
    weight = (torch.randn(vocab, d) * 0.02).requires_grad_()
    targets = torch.randint(vocab, (tokens,))
    impl, _, chunk = case.partition(":")
    recompute = impl == "fused-recompute"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = linear_cross_entropy(hidden, weight, targets, impl="plain" if impl == "plain" else "fused",
                                        chunk_size=int(chunk or 1), reduction="none" if recompute else "mean")
        (loss.mean() if recompute else loss).backward()
        hidden.grad = weight.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=24 * 64)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--rounds", type=int, default=5)
    add_device_args(parser)
    args = parser.parse_args()
    shape = (args.tokens, args.d, args.vocab, args.dtype)
    if args.child:
        job = json.loads(args.child)
        step = make_step(job["case"], *job["shape"])
        step()  # warm: first-call allocations are not the steady state
        peak, how = peak_bytes_of(step, torch.device("cpu"))
        print(json.dumps({"peak_bytes": peak, "how": how}))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = ["plain", *[f"fused:{c}" for c in args.chunks], f"fused-recompute:{args.chunks[len(args.chunks) // 2]}"]
    steps = {case: make_step(case, *shape) for case in cases}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {case: [] for case in cases}
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else reversed(cases):
            start = time.perf_counter()
            steps[case]()
            times[case].append(time.perf_counter() - start)
    memory = {case: run_child(__file__, {"case": case, "shape": shape}) for case in cases}
    plain_t = statistics.median(times["plain"])
    plain_m = memory["plain"].get("peak_bytes")
    print(f"\ntokens {args.tokens}, d {args.d}, vocab {args.vocab}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} alternating rounds; memory: {memory['plain'].get('how')}\n"
          "| case | fwd+bwd ms | vs plain | peak MB | vs plain |\n|---|---|---|---|---|")
    for case in cases:
        t, m = statistics.median(times[case]), memory[case].get("peak_bytes")
        mem = f"{m / 2**20:.0f} | {m / plain_m:.2f}x" if m and plain_m else f"{memory[case]} |"
        print(f"| {case} | {t * 1000:.0f} | {plain_t / t:.2f}x faster | {mem} |")


if __name__ == "__main__":
    main()
