"""int8 sampling against fp32, side by side in one run: decoding tokens/s (greedy, batch 1, through the cache)
and the whole-split validation loss of the same trained checkpoint.

    python bench/quantize.py                       # trains the default recipe for 300 steps first
    python bench/quantize.py --ckpt outputs/.../last.ckpt --sizes "model=gpt scale=seed"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import efficia  # noqa: E402
from bench.models import build  # noqa: E402
from efficia.config import compose_run  # noqa: E402
from efficia.inference.quantize import quantize_int8  # noqa: E402
from efficia.training.module import TrainingModule  # noqa: E402
from efficia.training.run import train  # noqa: E402


def decode_rate(net: torch.nn.Module, new: int, vocab: int) -> float:
    prompt = torch.randint(vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    new = min(new, net.max_seq_len - 16)  # within the trained context (a learned-position model cannot go past)
    with torch.inference_mode():
        cache = net.new_cache(1)
        logits = net(prompt, cache=cache)[:, -1]
        start = time.perf_counter()
        for _ in range(new):
            logits = net(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
        return new / (time.perf_counter() - start)


def speeds(make_net, new: int, vocab: int, repeats: int) -> tuple[float, float]:
    fp32, int8 = make_net().eval(), quantize_int8(make_net().eval())
    rates: dict[str, list[float]] = {"fp32": [], "int8": []}
    for i in range(repeats):  # alternating order
        for name, net in (("fp32", fp32), ("int8", int8)) if i % 2 == 0 else (("int8", int8), ("fp32", fp32)):
            rates[name].append(decode_rate(net, new, vocab))
    return statistics.median(rates["fp32"]), statistics.median(rates["int8"])


def val_loss(ckpt: str, quantize: bool) -> float:
    module = TrainingModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).eval()
    if quantize:
        quantize_int8(module.net)
    data = instantiate(compose_run([f"data.seq_len={module.cfg['data']['seq_len']}"], tempfile.gettempdir()).data,
                       tokenizer=module.cfg["tokenizer"])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a trained checkpoint (default: train the default recipe for 300 steps)")
    parser.add_argument("--sizes", default="model=gpt scale=seed", help="random-weight model for a second speed row")
    parser.add_argument("--new", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/quantize.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or train(compose_run(["logger=csv", "trainer.max_steps=300"], Path(tmp) / "run"))["last_ckpt"]
        loaded = efficia.load(ckpt)
        vocab = loaded.tokenizer.vocab_size
        rows = [{"model": f"trained checkpoint ({loaded.cfg['model']['name']}, {loaded.net.num_params() / 1e6:.2f}M)",
                 "speeds": speeds(lambda: efficia.load(ckpt).net, args.new, vocab, args.repeats),
                 "val": (val_loss(ckpt, False), val_loss(ckpt, True))}]
        spec = args.sizes.split()
        scale = next((s.split("=", 1)[1] for s in spec if s.startswith("scale=")), "seed")
        overrides = " ".join(s for s in spec if not s.startswith("scale="))
        size = build(overrides, scale, 512, vocab).num_params() / 1e6
        rows.append({"model": f"`{args.sizes}`, random weights ({size:.2f}M)",
                     "speeds": speeds(lambda: build(overrides, scale, 512, vocab), args.new, vocab, args.repeats),
                     "val": None})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"\ngreedy decoding, batch 1, up to {args.new} tokens (within each context) through the cache, "
          f"{torch.get_num_threads()} threads, "
          f"median of {args.repeats}\n| model | fp32 tok/s | int8 tok/s | speed-up | val loss fp32 | val loss int8 |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        (f, i), val = r["speeds"], r["val"]
        print(f"| {r['model']} | {f:,.0f} | {i:,.0f} | {i / f:.2f}x | "
              + (f"{val[0]:.4f} | {val[1]:.4f} |" if val else "| |"))


if __name__ == "__main__":
    main()
