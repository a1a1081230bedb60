"""Each logits processor on known logits, then generate() end to end on a real model."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import efficia.inference.generate as generate_module
from efficia.errors import ConfigError
from efficia.inference.generate import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    next_token,
)
from tests.conftest import build_tiny

INF = float("inf")


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_applies_once_per_distinct_token() -> None:
    """A token seen five times is penalised exactly as one seen once (the mask is per distinct token)."""
    logits = torch.tensor([[3.0, 3.0]])
    seen = torch.zeros(1, 2, dtype=torch.bool).scatter_(1, torch.tensor([[0, 0, 0, 0, 0]]), True)
    assert apply_repetition_penalty(logits, seen, 1.5).tolist() == [[2.0, 3.0]]


def test_repetition_penalty_is_per_row_in_a_batch() -> None:
    logits = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    seen = torch.tensor([[True, False], [False, True]])
    assert apply_repetition_penalty(logits, seen, 4.0).tolist() == [[0.25, 1.0], [1.0, 0.25]]


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    assert apply_top_k(logits, 2).tolist() == [[-INF, 5.0, -INF, 4.0], [4.0, 3.0, -INF, -INF]]
    assert torch.equal(apply_top_k(logits, None), logits)
    assert torch.equal(apply_top_k(logits, 10), logits)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = apply_top_p(logits, 0.7)  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep the first two
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = apply_top_p(logits, 0.5)  # the top token alone reaches 0.5
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]
    kept = apply_top_p(logits, 0.01)  # never empty
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]


def test_top_p_works_on_unsorted_rows_of_a_batch() -> None:
    logits = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.1, 0.6]]).log()
    kept = torch.isfinite(apply_top_p(logits, 0.8))
    assert kept.tolist() == [[False, True, True], [True, False, True]]


def test_temperature_zero_is_greedy_and_sees_the_penalty() -> None:
    logits = torch.tensor([[2.0, 1.9, -5.0]])
    no_seen = torch.zeros_like(logits, dtype=torch.bool)
    pick = lambda seen, rp: next_token(logits, seen, temperature=0, top_k=None, top_p=None,  # noqa: E731
                                       repetition_penalty=rp).item()
    assert pick(no_seen, 1.0) == 0
    assert pick(torch.tensor([[True, False, False]]), 1.2) == 1  # 2.0/1.2 < 1.9


def test_temperature_sharpens_the_sampled_distribution() -> None:
    logits = torch.tensor([[1.0, 0.0]]).repeat(4000, 1)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    share = {}
    for t in (0.5, 2.0):
        picks = next_token(logits, seen, temperature=t, top_k=None, top_p=None, repetition_penalty=1.0,
                           generator=gen)
        share[t] = (picks == 0).float().mean().item()
    expected = {t: 1 / (1 + math.exp(-1 / t)) for t in (0.5, 2.0)}  # softmax([1/t, 0])[0]
    for t in share:
        assert abs(share[t] - expected[t]) < 0.03


def test_sampling_never_picks_a_filtered_token() -> None:
    logits = torch.randn(500, 50, generator=torch.Generator().manual_seed(1))
    seen = torch.zeros_like(logits, dtype=torch.bool)
    picks = next_token(logits, seen, temperature=1.0, top_k=3, top_p=None, repetition_penalty=1.0)
    top3 = logits.topk(3, dim=-1).indices
    assert (picks[:, None] == top3).any(-1).all()


def test_bad_sampling_values_are_clear_errors() -> None:
    logits, seen = torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match="temperature=-1: give a number >= 0"):
        next_token(logits, seen, temperature=-1, top_k=None, top_p=None, repetition_penalty=1.0)
    with pytest.raises(ConfigError, match="repetition_penalty=0: give a number > 0"):
        next_token(logits, seen, temperature=1, top_k=None, top_p=None, repetition_penalty=0)


def tiny_gpt(max_seq_len: int = 16):
    return build_tiny("gpt", "model.pos_emb=learned", f"model.max_seq_len={max_seq_len}", vocab_size=11)


def test_greedy_generate_equals_argmax_of_full_forward_with_batch() -> None:
    model = tiny_gpt().eval()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, prompt, 8, temperature=0)
    assert out.shape == (2, 11)
    with torch.no_grad():
        for t in range(3, 11):  # each greedy token is the argmax of an uncached forward over its prefix
            assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))


def test_generate_runs_past_a_bounded_context_and_streams() -> None:
    model = tiny_gpt(max_seq_len=8)
    streamed = []
    out = generate(model, torch.tensor([[1, 2, 3]]), 30, on_token=streamed.append, temperature=1.0, top_k=5,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 33) and len(streamed) == 30
    assert torch.equal(torch.stack(streamed, 1), out[:, 3:])
    assert model.training, "generate restores the model's mode"


def test_sampling_does_not_import_the_training_stack() -> None:
    """sample.py starts fast: neither Lightning nor W&B is imported to sample from a checkpoint."""
    code = ("import sys, efficia.cli, efficia.inference.sampling_cli; "
            "print(sorted({'lightning', 'wandb'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_streamed_bpe_text_equals_the_result_and_decodes_each_token_once(monkeypatch) -> None:
    """With GPT-2 byte tokens a character can span tokens: the stream waits for it, shows exactly the final
    text, and decodes each new token once (not the whole continuation at every step)."""
    from efficia.data.tokenizers import TiktokenTokenizer
    from efficia.inference.loading import LoadedModel

    class CountingTokenizer(TiktokenTokenizer):
        decoded = 0

        def decode(self, ids: list[int]) -> str:
            CountingTokenizer.decoded += len(ids)
            return super().decode(ids)

    tokenizer = CountingTokenizer("gpt2")
    net = build_tiny("gpt", vocab_size=tokenizer.vocab_size)
    smile = tokenizer.encode("😀")  # 2 tokens for one character
    assert len(smile) == 2
    cfg = {"sampling": {"max_new_tokens": 12, "temperature": 1.0, "top_k": None, "top_p": None,
                        "repetition_penalty": 1.0}}
    model = LoadedModel(net.eval(), tokenizer, cfg)
    forced = iter(smile * 3 + tokenizer.encode(" a b c d e f"))  # the sampler is scripted: 12 known tokens
    monkeypatch.setattr(generate_module, "next_token",
                        lambda logits, seen, **kw: torch.full((logits.shape[0],), next(forced), dtype=torch.long))
    chunks: list[str] = []
    text = model.generate("Hi", on_text=chunks.append, max_new_tokens=12)[0]
    assert "".join(chunks) == text[len("Hi"):] and "😀😀😀" in text
    assert all("\ufffd" not in c for c in chunks)
    streamed_decodes = CountingTokenizer.decoded - 12  # the final decode of the whole row
    assert streamed_decodes <= 12 + len(smile) * 3, streamed_decodes
