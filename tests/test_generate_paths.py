"""generate() end to end against an independent reference: the repetition penalty on prompt *and*
generated tokens, and top-p at exact probability boundaries (the processors alone are in test_sampling.py).

The reference re-runs the full forward on the whole sequence at every step (no cache) and applies the
penalty with a plain loop over the distinct tokens so far, written here, not imported.
"""

from __future__ import annotations

import pytest
import torch

from efficia.inference.generate import apply_top_p, generate
from tests.conftest import build_tiny
from tests.trained_like import randomise

PENALTY = 3.0


def penalise(logits: torch.Tensor, tokens: list[int], penalty: float, per_occurrence: bool = False) -> torch.Tensor:
    """Once per distinct token: a positive logit divided by the penalty, a negative one multiplied
    (`per_occurrence`: once per occurrence, the bug to tell apart)."""
    out = logits.clone()
    for t in tokens if per_occurrence else set(tokens):
        out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty
    return out


def reference(model, prompt: torch.Tensor, steps: int, penalty: float, *, only_prompt: bool = False,
              per_occurrence: bool = False, temperature: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """Row by row, full forward each step; `only_prompt` penalises the prompt's tokens only and `per_occurrence`
    a token once per time it occurs (the bugs to tell apart). Sampling draws from one generator per call, as
    generate() does, row by row."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    seqs = [row.tolist() for row in prompt]
    for _ in range(steps):
        with torch.no_grad():
            last = model(torch.tensor(seqs))[:, -1].float()  # [B, V]
        rows = []
        for b, seq in enumerate(seqs):
            seen = seq[:prompt.shape[1]] if only_prompt else seq
            rows.append(penalise(last[b], seen, penalty, per_occurrence))
        logits = torch.stack(rows)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen).squeeze(-1)
        seqs = [seq + [int(t)] for seq, t in zip(seqs, nxt, strict=True)]
    return torch.tensor(seqs)


@pytest.fixture(scope="module")
def model():
    """A trained-like gpt (greedy decoding of it repeats tokens, so a penalty has work to do)."""
    return randomise(build_tiny("gpt"), seed=3).double().eval()


def test_greedy_repetition_penalty_covers_generated_tokens(model) -> None:
    prompt = torch.randint(37, (2, 4), generator=torch.Generator().manual_seed(0))
    steps = model.max_seq_len - prompt.shape[1]  # stays within the context: no re-priming
    out = generate(model, prompt, steps, temperature=0.0, repetition_penalty=PENALTY)
    want = reference(model, prompt, steps, PENALTY)
    assert torch.equal(out, want), f"generate() {out.tolist()} vs reference {want.tolist()}"
    # the test tells the penalty apart from no penalty and from a prompt-only penalty
    assert not torch.equal(want, reference(model, prompt, steps, 1.0))
    assert not torch.equal(want, reference(model, prompt, steps, PENALTY, only_prompt=True))


def test_a_token_repeated_in_the_prompt_is_penalised_once(model) -> None:
    """Token 2 six times: penalised once (its logit / 1.2) it stays the greedy pick; penalised per occurrence
    (/ 1.2^6) it would not, and the continuation would differ from its first token on."""
    prompt = torch.tensor([[2] * 6])
    out = generate(model, prompt, 6, temperature=0.0, repetition_penalty=1.2)
    assert torch.equal(out, reference(model, prompt, 6, 1.2))
    assert not torch.equal(out[:, 6], reference(model, prompt, 6, 1.2, per_occurrence=True)[:, 6])


def test_sampled_repetition_penalty_covers_generated_tokens(model) -> None:
    prompt = torch.randint(37, (1, 3), generator=torch.Generator().manual_seed(1))
    steps = 20
    out = generate(model, prompt, steps, temperature=0.7, repetition_penalty=PENALTY,
                   generator=torch.Generator().manual_seed(5))
    want = reference(model, prompt, steps, PENALTY, temperature=0.7, seed=5)
    assert torch.equal(out, want), f"generate() {out.tolist()} vs reference {want.tolist()}"
    assert not torch.equal(want, reference(model, prompt, steps, PENALTY, only_prompt=True, temperature=0.7,
                                           seed=5))


# -- top-p: the smallest set of most likely tokens whose probability reaches p -----------------------------

@pytest.mark.parametrize("vocab", [4, 10, 37, 50257])
def test_top_p_on_uniform_logits_keeps_exactly_the_tokens_that_reach_p(vocab: int) -> None:
    """Uniform over V: the smallest set reaching p = k/V is k tokens, for every k (a float64 running sum
    may land just below k/V; it must still count as reaching it)."""
    ks = range(1, vocab) if vocab < 100 else range(1, vocab, 4999)
    for k in ks:
        kept = torch.isfinite(apply_top_p(torch.zeros(2, vocab), k / vocab)).sum(-1)
        assert kept.tolist() == [k, k], f"V={vocab}, p={k}/{vocab}: kept {kept.tolist()}"


def test_top_p_just_past_a_boundary_keeps_one_more() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    for p, n in ((0.5, 1), (0.5 + 1e-6, 2), (0.75, 2), (0.75 + 1e-6, 3), (0.875, 3), (1.0, 4), (0.0, 1)):
        assert int(torch.isfinite(apply_top_p(logits, p)).sum()) == n, f"p={p}"


@pytest.mark.parametrize(("top_p", "expected"), [(0.5, 16), (0.8, 26)])
def test_top_p_through_generate_on_uniform_logits(top_p: float, expected: int, one_thread) -> None:
    """A real model whose head is zero gives exactly uniform logits over 32 tokens at every step:
    sampling with top_p draws from exactly the smallest set reaching p (0.8 of 32 tokens: 25.6 -> 26)."""
    model = build_tiny("gpt", vocab_size=32)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: the embeddings are zero too, so every step is uniform
    prompt = torch.zeros(1, 1, dtype=torch.long)
    out = generate(model, prompt, 400, temperature=1.0, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert len(set(out[0, 1:].tolist())) == expected
