"""What the framework costs: the real Lightning loop (`efficia.training.run.train`, default callbacks, CSV logger)
against a bare PyTorch loop over the same model, optimizer, schedule and batches, in one process,
alternating, with the MFU of each against the fp32 matmul peak measured in the same run.

Neither side validates or writes checkpoints (the bare loop has neither). Throughput is timed from the end
of the first step to the end of the last, the same way on both sides (RunRecord's tokens/s for Lightning).

    python bench/overhead.py                                   # gpt at scale=small, 300 steps, 3 pairs
    python bench/overhead.py --steps 12 --repeats 2 model=gpt scale=seed model.dropout=0.0 data.batch_size=16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficia.config import compose_run  # noqa: E402
from efficia.training.module import TrainingModule  # noqa: E402
from efficia.training.run import train  # noqa: E402
from efficia.training.throughput import measure_cpu_peak, training_flops_per_token  # noqa: E402

LIGHTNING = ["logger=csv", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
             "callbacks.checkpoint=null", "callbacks.early_stopping=null"]


def bare_loop(overrides: list[str], steps: int, out: Path) -> float:
    """Tokens/s of forward, loss, backward, clip, AdamW and LR schedule; nothing else."""
    cfg = compose_run([*LIGHTNING, *overrides], out)
    plain = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(cfg.seed)
    data = instantiate(cfg.data, tokenizer=plain["tokenizer"])
    data.prepare()
    module = TrainingModule(plain, data.tokenizer.state())
    optimizer, schedule = module.optimizer_and_schedule(steps)
    net, clip = module.net.train(), cfg.trainer.gradient_clip_val
    batches = iter(data.train_dataloader())
    start, tokens = 0.0, 0
    for step in range(steps):
        x, y = next(batches)
        loss = module.loss((x, y))  # the output unit training uses (loss.impl)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            start = time.perf_counter()
        else:
            tokens += x.numel()
    return tokens / (time.perf_counter() - start)


def lightning_loop(overrides: list[str], steps: int, out: Path) -> float:
    cfg = compose_run([*LIGHTNING, f"trainer.max_steps={steps}", *overrides], out)
    train(cfg)
    return json.loads((out / "run_record.json").read_text())["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    parser.add_argument("overrides", nargs="*", help="train.py overrides (model, scale, batch ...)")
    args = parser.parse_args()
    cfg = compose_run(args.overrides, tempfile.gettempdir())
    vocab = 65 if cfg.tokenizer.kind == "char" else None
    if vocab is None:
        sys.exit("bench/overhead.py measures character-level runs (tokenizer=char)")
    flops = training_flops_per_token(OmegaConf.to_container(cfg.model, resolve=True), vocab, cfg.data.seq_len)
    peaks, rates = [measure_cpu_peak()], {"bare": [], "lightning": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name in (("bare", "lightning") if i % 2 == 0 else ("lightning", "bare")):
                fn = bare_loop if name == "bare" else lightning_loop
                rates[name].append(fn(args.overrides, args.steps, Path(tmp) / f"{name}{i}"))
                print(f"{name}: {rates[name][-1]:,.0f} tokens/s", file=sys.stderr, flush=True)
            peaks.append(measure_cpu_peak())
    peak = statistics.median(peaks)
    bare, lightning = statistics.median(rates["bare"]), statistics.median(rates["lightning"])
    result = {"overrides": args.overrides, "steps": args.steps, "threads": torch.get_num_threads(),
              "flops_per_token": flops, "peak_flops": peak, "peaks": peaks, "rates": rates,
              "bare_tokens_per_s": bare, "lightning_tokens_per_s": lightning,
              "overhead": bare / lightning - 1, "bare_mfu": bare * flops / peak,
              "lightning_mfu": lightning * flops / peak}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{' '.join(args.overrides) or 'defaults'}: {flops / 1e6:.2f} MFLOP/token (measured), fp32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads, medians of {args.repeats}\n"
          f"| loop | tokens/s | MFU |\n|---|---|---|\n"
          f"| bare PyTorch | {bare:,.0f} | {result['bare_mfu']:.0%} |\n"
          f"| Lightning (efficia.training.run.train) | {lightning:,.0f} | {result['lightning_mfu']:.0%} |\n"
          f"Lightning overhead: {result['overhead']:+.1%}  ({args.out})")


if __name__ == "__main__":
    main()
