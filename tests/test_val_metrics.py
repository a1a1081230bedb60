"""val/loss and val/bpb as train() logs them, against an independent pass over the whole held-out split.

The reference is written here from first principles: the held-out text is the last val_fraction of
input.txt, encoded with tiktoken's GPT-2 directly; its non-overlapping windows are run through the
trained weights in a plain loop; bytes are counted by decoding each target token to UTF-8 bytes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F

from efficia.build import build_model
from efficia.training.run import train
from tests.conftest import require_data


def test_val_loss_and_bpb_equal_an_independent_pass_over_the_split(make_cfg) -> None:
    require_data()
    cfg = make_cfg("scale=tiny", "tokenizer=gpt2", "logger=csv", "data.val_fraction=0.005", "data.val_batch_size=5",
                   "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0",
                   "trainer.limit_val_batches=1.0", "callbacks.early_stopping=null", "callbacks.progress_bar=null",
                   "callbacks.loss_curve=null")
    result = train(cfg)
    logged = result["metrics"]

    text = (Path(os.environ["EFFICIA_DATA_DIR"]) / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    held_out = text[int(len(text) * (1 - 0.005)):]
    enc = tiktoken.get_encoding("gpt2")
    tokens = torch.tensor(enc.encode_ordinary(held_out))
    T = cfg.model.max_seq_len
    n_windows = (len(tokens) - 1) // T
    assert n_windows > 5 and n_windows % 5, "several batches, the last one partial"

    ckpt = torch.load(result["last_ckpt"], weights_only=False)
    assert ckpt["global_step"] == 2
    model = build_model(dict(cfg.model), enc.n_vocab)
    model.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    model.eval()
    nats, count, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for i in range(n_windows):
            x, y = tokens[i * T:(i + 1) * T], tokens[i * T + 1:(i + 1) * T + 1]
            nats += F.cross_entropy(model(x[None])[0].double(), y, reduction="sum").item()
            count += len(y)
            n_bytes += sum(len(enc.decode_single_token_bytes(t)) for t in y.tolist())
    assert n_bytes > count, "GPT-2 tokens are several bytes each"
    assert math.isclose(logged["val/loss"], nats / count, rel_tol=1e-5), (logged["val/loss"], nats / count)
    assert math.isclose(logged["val/bpb"], nats / n_bytes / math.log(2), rel_tol=1e-5)
