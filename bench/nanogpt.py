"""nanoGPT's README CPU recipe (karpathy/nanoGPT: model.py + train.py with config/train_shakespeare_char.py
and `--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`), re-implemented
in one file so `bench/learning_speed.py` can time it beside `python train.py` on the same machine.

Same algorithm, same order of random draws: GPT with learned positions, LayerNorm without bias, tied
head, N(0, 0.02) init (residual projections / sqrt(2L)); AdamW (0.9, 0.99), weight decay 0.1 on matrices,
warmup 100 + cosine from 1e-3 to 1e-4; random windows from a memmap re-opened per batch; a 20-batch
train/val estimate and a checkpoint when it improves every 250 iterations; iterations 0..2000.
After training (outside its time) the final weights are scored on the whole validation split in
non-overlapping 64-character windows, the protocol efficia's validation uses.

    python bench/nanogpt.py --text ../shared/data/tinyshakespeare/input.txt --out /tmp/nanogpt

On other tokens (bench/bpe_speed.py): `--bins DIR` reads DIR/train.bin and DIR/val.bin (uint16, as nanoGPT's
prepare.py scripts write them) with `--vocab 50304` (nanoGPT's padded GPT-2 vocabulary when there is no
meta.pkl), and `--batch`, `--iters` change the recipe's batch and length (the schedule decays over --iters).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH, MAX_ITERS = 4, 4, 128, 64, 12, 2000
LR, MIN_LR, WARMUP, DECAY_ITERS, BETAS, WEIGHT_DECAY, CLIP = 1e-3, 1e-4, 100, 2000, (0.9, 0.99), 0.1, 1.0
EVAL_INTERVAL, EVAL_ITERS = 250, 20


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
        q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(N_EMBD, bias=False)
        self.attn = SelfAttention()
        self.ln_2 = nn.LayerNorm(N_EMBD, bias=False)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.mlp.gelu = nn.GELU()
        self.mlp.c_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, N_EMBD), wpe=nn.Embedding(BLOCK, N_EMBD),
            h=nn.ModuleList([Block() for _ in range(N_LAYER)]), ln_f=nn.LayerNorm(N_EMBD, bias=False)))
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * N_LAYER))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def prepare(text_file: Path, out: Path) -> int:
    """nanoGPT's data/shakespeare_char/prepare.py: sorted characters, first 90% train, uint16 .bin files."""
    text = text_file.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    out.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", text[:int(n * 0.9)]), ("val", text[int(n * 0.9):])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(out / f"{split}.bin")
    return len(chars)


def main() -> None:
    global BATCH, MAX_ITERS, DECAY_ITERS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, help="tiny Shakespeare's input.txt")
    parser.add_argument("--out", required=True, type=Path, help="folder for the .bin files and ckpt.pt")
    parser.add_argument("--bins", type=Path, help="a folder with train.bin/val.bin already made (then --vocab)")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--iters", type=int, default=MAX_ITERS)
    args = parser.parse_args()
    if not (args.bins and args.vocab) and not args.text:
        parser.error("give --text (tiny Shakespeare) or --bins with --vocab")
    BATCH, MAX_ITERS, DECAY_ITERS = args.batch, args.iters, args.iters
    if args.bins:
        args.out.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            (args.out / f"{split}.bin").write_bytes((args.bins / f"{split}.bin").read_bytes())
        vocab_size = args.vocab
    else:
        vocab_size = prepare(args.text, args.out)

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(args.out / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - BLOCK, (BATCH,))
        x = torch.stack([torch.from_numpy(data[i:i + BLOCK].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + BLOCK].astype(np.int64)) for i in ix])
        return x, y

    torch.manual_seed(1337)
    model = GPT(vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {split: float(torch.tensor([model(*get_batch(split)).item() for _ in range(EVAL_ITERS)]).mean())
               for split in ("train", "val")}
        model.train()
        return out

    def get_lr(it: int) -> float:
        if it < WARMUP:
            return LR * (it + 1) / (WARMUP + 1)
        if it > DECAY_ITERS:
            return MIN_LR
        ratio = (it - WARMUP) / (DECAY_ITERS - WARMUP)
        return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)

    x, y = get_batch("train")
    best_val, estimates, train_s, timed_iters = 1e9, [], 0.0, 0
    for it in range(MAX_ITERS + 1):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        if it % EVAL_INTERVAL == 0:
            losses = estimate_loss()
            estimates.append({"iter": it, "time": time.time(), **losses})
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            if losses["val"] < best_val:
                best_val = losses["val"]
                if it > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": it},
                               os.path.join(args.out, "ckpt.pt"))
        t0 = time.perf_counter()
        loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"iter {it}: loss {loss.item():.4f}", flush=True)
        if it > 0:  # the first iteration (warm-up) and the periodic estimates are not timed, as efficia's record
            train_s, timed_iters = train_s + time.perf_counter() - t0, timed_iters + 1
    train_end = time.time()

    model.eval()  # whole validation split, non-overlapping windows, mean over every predicted token
    val = torch.from_numpy(np.fromfile(args.out / "val.bin", dtype=np.uint16).astype(np.int64))
    n = (len(val) - 1) // BLOCK
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, 64):
            rows = range(start, min(n, start + 64))
            xb = torch.stack([val[i * BLOCK:(i + 1) * BLOCK] for i in rows])
            yb = torch.stack([val[i * BLOCK + 1:(i + 1) * BLOCK + 1] for i in rows])
            total += float(model(xb, yb)) * yb.numel()
            count += yb.numel()
    print(json.dumps({"train_end": train_end, "val_whole": total / count, "estimates": estimates,
                      "tokens_per_s": timed_iters * BATCH * BLOCK / train_s if train_s else None,
                      "tokens": (MAX_ITERS + 1) * BATCH * BLOCK}), flush=True)


if __name__ == "__main__":
    main()
