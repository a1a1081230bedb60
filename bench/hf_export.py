"""format=hf at scale=small with GPT-2 tokens, per model: export time, folder size, the largest logit difference
between transformers and efficia on one prompt, and whether 32 greedy tokens agree (and each side's time for them).
Trained-like weights (tests/trained_like.py), one thread each, both sides in one process.

    python bench/hf_export.py                      # every registered model
    python bench/hf_export.py optimus gpt
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import efficia  # noqa: E402
from efficia.build import build_model
from efficia.config import compose_run  # noqa: E402
from efficia.data.tokenizers import TiktokenTokenizer  # noqa: E402
from efficia.inference.loading import LoadedModel  # noqa: E402
from efficia.models import MODELS  # noqa: E402
from tests.trained_like import randomise  # noqa: E402

PROMPT = "The history of the Roman Empire"


def main(names: list[str]) -> None:
    import transformers

    torch.set_num_threads(1)
    tokenizer = TiktokenTokenizer("gpt2")
    root = Path(tempfile.mkdtemp(prefix="efficia-hf-bench-"))
    for name in names:
        cfg = OmegaConf.to_container(compose_run([f"model={name}", "scale=small", "tokenizer=gpt2"], root / "run"),
                                     resolve=True)
        torch.manual_seed(0)
        net = randomise(build_model(cfg["model"], tokenizer.vocab_size)).eval()
        model = LoadedModel(net, tokenizer, cfg)
        t0 = time.perf_counter()
        out = efficia.save_pretrained(model, root / name, format="hf")
        export_s = time.perf_counter() - t0
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
        ids = hf_tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            diff = (hf(input_ids=ids).logits - net(ids)).abs().max().item()
        t0 = time.perf_counter()
        theirs = hf_tokenizer.decode(hf.generate(ids, max_new_tokens=32, do_sample=False)[0])
        t1 = time.perf_counter()
        ours = model.generate(PROMPT, max_new_tokens=32, temperature=0)[0]
        t2 = time.perf_counter()
        size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
        print(f"{name}: {type(hf).__name__}, {net.num_params() / 1e6:.2f}M params, export {export_s:.1f} s, "
              f"folder {size:.1f} MB, max |logit diff| {diff:.2e}, 32 greedy tokens identical: {theirs == ours} "
              f"(transformers {t1 - t0:.2f} s, efficia {t2 - t1:.2f} s)")


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(MODELS))
