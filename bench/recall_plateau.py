"""Bare-loop MQAR calibration: gpt on fresh seeded batches per step, test accuracy at 64x8 every N steps.

    python bench/recall_plateau.py V=8192 D=64 H=2 B=64 lr=3e-3 warm=100 steps=3000   # experiment=recall's recipe
    python bench/recall_plateau.py V=128                                               # the same, small vocabulary

Keys: T P V B L D H lr warm wd steps every seed (seq_len, pairs, vocab, batch, layers, width, heads, ...,
initialisation seed). One thread;
the same generator (efficia.data.mqar) and model (efficia.models) as train.py without Lightning, to scan recipes
fast: AdamW (betas 0.9/0.95, decay on matrices only), clip 1, warmup then cosine to 0.1, logits of the scored
(answer) rows only, as the framework's output unit. Prints test accuracy and process CPU seconds.
"""
import math
import sys
import time

import torch
import torch.nn.functional as F

from efficia.build import build_model
from efficia.data.mqar import make_split, split_batch


def main() -> None:
    torch.set_num_threads(1)
    args = dict(a.split("=") for a in sys.argv[1:])
    T, P, V, B = (int(args.get(k, d)) for k, d in (("T", 64), ("P", 8), ("V", 8192), ("B", 64)))
    L, D, H = (int(args.get(k, d)) for k, d in (("L", 2), ("D", 64), ("H", 2)))
    lr, wd = float(args.get("lr", 3e-3)), float(args.get("wd", 0.1))
    steps, warm, every = (int(args.get(k, d)) for k, d in (("steps", 3000), ("warm", 100), ("every", 250)))
    torch.manual_seed(int(args.get("seed", 0)))
    cfg = dict(name="gpt", d_model=D, n_layer=L, n_head=H, n_kv_head=None, max_seq_len=T, dropout=0.0, bias=False,
               pos_emb="rope", rope_theta=10000.0, gradient_checkpointing=False, ffn_hidden=4 * D, tie_embeddings=True)
    net = build_model(cfg, V)
    params = list(net.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    tx, ty = make_split(1337, 500, T, P, V, test=True)

    def answer_logits(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scored = y != -100
        return net.hidden(x)[scored] @ net.head_weight.T, y[scored]

    def evaluate() -> float:
        net.eval()
        with torch.no_grad():
            logits, targets = answer_logits(tx, ty)
            acc = (logits.argmax(-1) == targets).float().mean().item()
        net.train()
        return acc

    t0 = time.process_time()
    for s in range(steps):
        x, y = split_batch(1337, s, B, T, P, V, test=False)
        f = min(1, (s + 1) / warm)
        if s >= warm:
            f *= 0.5 * (1 + math.cos(math.pi * min(1, s / steps))) * 0.9 + 0.1
        for group in opt.param_groups:
            group["lr"] = lr * f
        loss = F.cross_entropy(*answer_logits(x, y))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if (s + 1) % every == 0:
            print(f"step {s + 1} loss {loss.item():.3f} acc {evaluate():.4f} cpu {time.process_time() - t0:.0f}s",
                  flush=True)


if __name__ == "__main__":
    main()
