"""Sampling and cached decoding, once for every model.

Each logits processor is a pure function on a [B, V] tensor so it can be tested on known logits.
`generate` drives any model through its own cache: prefill the prompt, then one token at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from efficia.checks import check_sampling
from efficia.models.decoder import LanguageModel


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Once per distinct seen token: divide a positive logit by `penalty`, multiply a negative one.

    `seen` is a [B, V] boolean mask of tokens already in each sequence (prompt included).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: Tensor, k: int | None) -> Tensor:
    """Keep the k most likely tokens; 0 or None keeps all."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float | None) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (always at least one, so
    p=0 keeps only the most likely token, as Hugging Face does).

    The running sum is taken in float64: in float32 over a 50k vocabulary it drifts by ~1e-5, which
    at p=0.999 moves the cut by hundreds of tokens. Even in float64 a sum that reaches p exactly
    (uniform logits over 10 tokens, p=0.8: 8 tokens) can land a rounding error below it, so "reaches"
    allows the sum's own rounding bound (a few V·eps).
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.double().softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    rounding = 4 * logits.shape[-1] * torch.finfo(torch.float64).eps
    drop_sorted = before >= p - rounding  # the tokens before it already reach p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: Tensor, seen: Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
               repetition_penalty: float, generator: torch.Generator | None = None) -> Tensor:
    """Pick the next token for each row of logits[B, V]. Temperature 0 is greedy."""
    check_sampling({"temperature": temperature, "top_k": top_k, "top_p": top_p,
                    "repetition_penalty": repetition_penalty})
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_top_p(apply_top_k(logits / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(model: LanguageModel, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                    generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Yield the next token [B] for a batch of prompts [B, T], one step at a time.

    When a model with a bounded context fills its cache, a new cache is primed with the latest half
    context (as nanoGPT crops its input), so generation can run for any length.
    """
    was_training = model.training
    model.eval()
    try:
        batch = prompt.shape[0]
        context = prompt
        limit = model.max_context
        if limit is not None and context.shape[1] > limit:
            context = context[:, -limit:]
        cache = model.new_cache(batch)
        logits = model.last_logits(context, cache=cache)
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, prompt, True)
        for _ in range(max_new_tokens):
            token = next_token(logits, seen, temperature=temperature, top_k=top_k, top_p=top_p,
                               repetition_penalty=repetition_penalty, generator=generator)
            yield token
            seen.scatter_(1, token[:, None], True)
            context = torch.cat([context, token[:, None]], dim=1)
            if limit is not None and cache.pos >= limit:
                context = context[:, -(limit // 2):]
                cache = model.new_cache(batch)
                logits = model.last_logits(context, cache=cache)
            else:
                logits = model.last_logits(token[:, None], cache=cache)
            if limit is None:
                context = context[:, -1:]  # an unbounded model never needs the text back
    finally:
        model.train(was_training)


def generate(model: LanguageModel, prompt: Tensor, max_new_tokens: int,
             on_token: Callable[[Tensor], None] | None = None, **sampling) -> Tensor:
    """Prompt [B, T] -> [B, T + max_new_tokens]; `on_token` sees each new [B] token as it is made."""
    tokens = []
    for token in generate_tokens(model, prompt, max_new_tokens, **sampling):
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    return torch.cat([prompt, *[t[:, None] for t in tokens]], dim=1)
