"""Lumenspark-specific tests: block-causal Linformer attention against a per-query reference, the
compressed decoding state, and proof that the generic causality check catches a plain Linformer.

The generic causality / cache-equals-forward / cache_bytes tests over the registry live in test_models.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from efficia.errors import ConfigError
from efficia.models import lumenspark
from efficia.models.kernels import attend_sink, softmax_with_lse, with_sink
from efficia.models.lumenspark import (
    BlockLinformerAttention,
    LowRankFeedForward,
    block_causal_attention,
    compress,
    pooling_projection,
)
from tests.conftest import build_tiny
from tests.memory import saved_tensors
from tests.test_models import assert_causal
from tests.trained_like import randomise

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def reference_attention(q, k, v, e, f, block):
    """One query at a time: the slots E·K, F·V of every completed earlier block, then the exact keys of
    its own block up to itself; plain softmax. q[B,H,T,D], k,v[B,Hkv,T,D] (repeated to H heads)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.empty_like(q)
    for p in range(q.shape[2]):
        c = p // block
        slot_k = [e @ k[:, :, b * block:(b + 1) * block] for b in range(c)]
        slot_v = [f @ v[:, :, b * block:(b + 1) * block] for b in range(c)]
        keys = torch.cat([*slot_k, k[:, :, c * block:p + 1]], dim=2)
        values = torch.cat([*slot_v, v[:, :, c * block:p + 1]], dim=2)
        scores = q[:, :, p:p + 1] @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[:, :, p:p + 1] = scores.softmax(-1) @ values
    return out


@pytest.mark.parametrize(("T", "block", "slots", "kv_heads"), [(13, 4, 3, 2), (16, 4, 1, 4), (7, 8, 2, 1)])
def test_block_causal_attention_equals_the_per_query_reference(T, block, slots, kv_heads) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 8, generator=gen)
    k, v = torch.randn(2, 2, kv_heads, T, 8, generator=gen)
    e, f = torch.randn(2, slots, block, generator=gen)
    torch.testing.assert_close(block_causal_attention(q, k, v, e, f, block),
                               reference_attention(q, k, v, e, f, block), atol=1e-5, rtol=1e-5)


def previous_block_causal_attention(q: Tensor, k: Tensor, v: Tensor, e: Tensor, f: Tensor, block: int,
                           past_k: Tensor | None = None, past_v: Tensor | None = None,
                           dropout: float = 0.0) -> Tensor:
    """The previous formulation, kept as the reference: every block attends over ALL slots (its keys and values
    copied per block) under a [block, P + (n-1)·S + block] mask.

    k, v start at a block boundary and the queries are their last Tq positions (bottom-right
    aligned, as in a cached call). A query in block c sees: every `past` slot ([B,Hkv,P,D], from
    blocks before k's first one), the slots of blocks 0..c-1 of k, and the exact keys of block c
    up to itself. One SDPA call: the blocks are a batch dimension, each with a
    [block, P + (n-1)·S + block] mask.
    """
    B, H, q_len, D = q.shape
    Hkv, k_len, S = k.shape[1], k.shape[2], e.shape[0]
    n = -(-k_len // block)
    front, pad = k_len - q_len, n * block - k_len
    q = F.pad(q, (0, 0, front, pad))  # dummy queries before (< one block) and after (padding)
    k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    # slots of blocks 0..n-2 (the last block is nobody's earlier block here)
    slots_k, slots_v = compress(k[:, :, :(n - 1) * block], e, block), compress(v[:, :, :(n - 1) * block], f, block)
    if past_k is not None:
        slots_k = torch.cat((past_k.to(k.dtype), slots_k), dim=2)  # [B, Hkv, P + (n-1)·S, D]
        slots_v = torch.cat((past_v.to(v.dtype), slots_v), dim=2)
    n_past = slots_k.shape[2] - (n - 1) * S
    ctx = slots_k.shape[2]

    def per_block(own: Tensor, slots: Tensor) -> Tensor:
        own = own.reshape(B, Hkv, n, block, D).transpose(1, 2)  # [B, n, Hkv, block, D]
        slots = slots[:, None].expand(B, n, Hkv, ctx, D)  # [B, n, Hkv, ctx, D]
        return torch.cat((slots, own), dim=3).flatten(0, 1)  # [B·n, Hkv, ctx + block, D]

    # 4-D [B·n, H, block, D]: the fused SDPA kernels take 4-D inputs only (5-D falls back to the math
    # path, which materialises the scores: about 2x slower on the CPU)
    qb = q.reshape(B, H, n, block, D).transpose(1, 2).flatten(0, 1)  # [B·n, H, block, D]
    mask = previous_block_causal_mask(n, block, S, n_past, q.device)  # [n, 1, block, ctx + block]
    mask = mask if B == 1 else mask.repeat(B, 1, 1, 1)  # [B·n, 1, block, ctx + block]
    out = F.scaled_dot_product_attention(qb, per_block(k, slots_k), per_block(v, slots_v), attn_mask=mask,
                                         dropout_p=dropout, enable_gqa=H != Hkv)  # [B·n, H, block, D]
    out = out.view(B, n, H, block, D).transpose(1, 2).reshape(B, H, n * block, D)  # [B, H, n·block, D]
    return out[:, :, front:front + q_len]


def previous_block_causal_mask(n: int, block: int, k_per_block: int, n_past: int, device: torch.device) -> Tensor:
    """[n, 1, block, n_past + (n-1)·k_per_block + block], True where visible: every past slot, the slots
    of earlier blocks, and the own block's keys causally."""
    c = torch.arange(n, device=device)[:, None, None, None]  # the query's block
    slot_block = torch.arange((n - 1) * k_per_block, device=device) // k_per_block
    earlier = (slot_block < c).expand(n, 1, block, -1)  # [n, 1, block, (n-1)·S]
    pos = torch.arange(block, device=device)
    causal = (pos[None, :] <= pos[:, None]).expand(n, 1, block, block)
    past = torch.ones(n, 1, block, n_past, dtype=torch.bool, device=device)
    return torch.cat((past, earlier, causal), dim=-1)


@pytest.mark.parametrize(("T", "front", "n_past", "block", "slots", "kv_heads"),
                         [(40, 0, 0, 8, 2, 1), (37, 0, 0, 8, 3, 2), (21, 5, 6, 8, 2, 1), (1, 3, 4, 4, 2, 2),
                          (9, 0, 0, 16, 4, 1)])
def test_fused_attention_equals_the_previous_formulation(T, front, n_past, block, slots, kv_heads) -> None:
    """Training (no past, no front) and cached-call shapes (past slots, queries starting inside a block), on
    trained-like E/F (far from the pooling init) and scores of a trained model's size. In float64: at these
    scores every float32 formulation, this one included, is off the exact result by 1-3e-5."""
    gen = torch.Generator().manual_seed(T + front)
    q = 3 * torch.randn(2, 4, T, 8, generator=gen, dtype=torch.float64)
    k, v = 3 * torch.randn(2, 2, kv_heads, front + T, 8, generator=gen, dtype=torch.float64)
    e, f = torch.randn(2, slots, block, generator=gen, dtype=torch.float64)
    past_k, past_v = (torch.randn(2, 2, kv_heads, n_past, 8, generator=gen, dtype=torch.float64) if n_past
                      else (None, None))
    got = block_causal_attention(q, k, v, e, f, block, past_k, past_v)
    want = previous_block_causal_attention(q, k, v, e, f, block, past_k, past_v)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def looped_block_causal_attention(q: Tensor, k: Tensor, v: Tensor, e: Tensor, f: Tensor, block: int,
                                  past_k: Tensor | None = None, past_v: Tensor | None = None) -> Tensor:
    """The formulation before the single fused call, kept as the reference: the own block's causal attention
    batched over blocks, then one SDPA per block (a Python loop) over a view of the slot prefix, the own part
    folded in as the sink term."""
    B, H, q_len, D = q.shape
    Hkv, k_len, S = k.shape[1], k.shape[2], e.shape[0]
    n, G = -(-k_len // block), H // Hkv
    front, pad = k_len - q_len, n * block - k_len
    q = F.pad(q, (0, 0, front, pad))
    k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    scale = 1.0 / math.sqrt(D)
    qb = q.view(B, Hkv, G, n, block, D)
    kb, vb = k.view(B, Hkv, 1, n, block, D), v.view(B, Hkv, 1, n, block, D)
    causal = torch.ones(block, block, dtype=torch.bool).tril()
    scores = (qb @ kb.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
    own_lse = scores.logsumexp(-1)
    own_out = torch.exp(scores - own_lse[..., None]) @ vb
    own_lse, own_out = own_lse.reshape(B, H, n * block), own_out.reshape(B, H, n * block, D)
    slots_k, slots_v = compress(k[:, :, :(n - 1) * block], e, block), compress(v[:, :, :(n - 1) * block], f, block)
    if past_k is not None:
        slots_k, slots_v = torch.cat((past_k, slots_k), dim=2), torch.cat((past_v, slots_v), dim=2)
    n_past = slots_k.shape[2] - (n - 1) * S
    slots_k, slots_v = with_sink(slots_k, slots_v)
    outs = []
    per_block = zip(*(t.split(block, dim=2) for t in (q, own_lse, own_out)), strict=True)
    for c, (q_c, lse_c, out_c) in enumerate(per_block):
        if c < front // block:
            continue
        ctx = 1 + n_past + c * S
        outs.append(attend_sink(q_c, slots_k[:, :, :ctx], slots_v[:, :, :ctx], lse_c, out_c, is_causal=False,
                                scale=scale))
    out = torch.cat(outs, dim=2)
    start = front - front // block * block
    return out[:, :, start:start + q_len]


# (q_len, front, n_past, block, slots, kv_heads): training shapes (whole and partial blocks, slots that do not
# divide the block, one slot, as many slots as tokens) and cached-call shapes (queries starting inside a block,
# past slots fewer or more than one block's)
SHAPES = [(64, 0, 0, 16, 4, 1), (45, 0, 0, 8, 3, 2), (37, 0, 0, 5, 3, 4), (24, 0, 0, 4, 1, 1), (12, 0, 0, 4, 4, 2),
          (3, 0, 0, 8, 2, 1), (21, 5, 6, 8, 2, 1), (1, 3, 4, 4, 2, 2), (30, 2, 9, 8, 3, 2), (7, 0, 2, 4, 2, 1),
          (19, 6, 1, 8, 3, 1)]


@pytest.mark.parametrize(("T", "front", "n_past", "block", "slots", "kv_heads"), SHAPES)
def test_fused_attention_equals_the_looped_one_with_gradients(T, front, n_past, block, slots, kv_heads) -> None:
    """Outputs and the gradients of q, k, v, E, F and the past slots equal the per-block loop's, on trained-like
    E/F (far from the pooling init) and scores of a trained model's size, in float64."""
    gen = torch.Generator().manual_seed(T + 7 * front + block)
    q = 3 * torch.randn(2, 4, T, 8, generator=gen, dtype=torch.float64)
    k, v = 3 * torch.randn(2, 2, kv_heads, front + T, 8, generator=gen, dtype=torch.float64)
    e, f = torch.randn(2, slots, block, generator=gen, dtype=torch.float64)
    past = list(torch.randn(2, 2, kv_heads, n_past, 8, generator=gen, dtype=torch.float64)) if n_past else []
    inputs = [t.requires_grad_() for t in (q, k, v, e, f, *past)]
    grad_out = torch.randn(2, 4, T, 8, generator=gen, dtype=torch.float64)
    results = []
    for attention in (block_causal_attention, looped_block_causal_attention):
        out = attention(q, k, v, e, f, block, *(past or (None, None)))
        results.append((out, torch.autograd.grad(out, inputs, grad_out)))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for name, g, w in zip(("q", "k", "v", "e", "f", "past_k", "past_v"), got_grads, want_grads, strict=False):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9, msg=f"gradient of {name}")


def test_training_path_is_one_fused_causal_call_whatever_the_length(monkeypatch) -> None:
    """No loop over blocks and no mask: a training-shaped call (no past) is ONE causal SDPA, at 2 and at 64
    blocks alike, over keys [sinks, slots] (no copy of the slots per block)."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((k.shape[-2], kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for T in (32, 1024):
        calls.clear()
        q, (k, v) = torch.randn(1, 4, T, 8), torch.randn(2, 1, 1, T, 8)
        block_causal_attention(q, k, v, *torch.randn(2, 4, 16), 16)
        assert len(calls) == 1, f"{len(calls)} SDPA calls at T={T}"
        keys, mask, causal = calls[0]
        assert mask is None and causal and keys == 4 + 1 + (T // 16 - 1) * 4


def test_softmax_with_lse_has_both_gradients_and_keeps_only_the_probabilities() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = (4 * torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)).masked_fill(
        torch.rand(3, 5, 7, generator=gen) < 0.3, float("-inf"))
    scores[..., 0] = 1.0  # every row has a finite score
    scores.requires_grad_()
    g_p, g_l = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen,
                                                                                          dtype=torch.float64)
    (probs, lse), kept = saved_tensors(softmax_with_lse, scores)
    assert [shape for shape, _ in kept] == [(3, 5, 7)]  # probabilities only (logsumexp would keep the scores)
    want_p, want_l = scores.softmax(-1), scores.logsumexp(-1)
    torch.testing.assert_close((probs, lse), (want_p, want_l))
    got = torch.autograd.grad((probs * g_p).sum() + (lse * g_l).sum(), scores)[0]
    want = torch.autograd.grad((want_p * g_p).sum() + (want_l * g_l).sum(), scores)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("T", "chunk"), [(11, 4), (8, 8), (5, 1024)])
def test_factorised_feed_forward_keeps_no_hidden_activation_and_has_the_same_gradients(T, chunk, monkeypatch) -> None:
    """The lean training path (chunks of tokens, the hidden activation recomputed) equals the plain composition
    proj(gelu(fc(x))): outputs and the gradients of x and of every weight, on trained-like weights, with chunks
    that do not divide the tokens; and nothing `hidden` wide is kept for backward (the plain path keeps two)."""
    ffn = randomise(LowRankFeedForward(8, 40, 3))
    real = lumenspark.factorised_gelu
    monkeypatch.setattr(lumenspark, "factorised_gelu", lambda z, up, down: real(z, up, down, chunk))
    x = torch.randn(2, T, 8, generator=torch.Generator().manual_seed(T), requires_grad=True)
    grad = torch.randn(2, T, 8, generator=torch.Generator().manual_seed(T + 1))
    results = []
    for forward in (ffn, lambda x: ffn.proj(F.gelu(ffn.fc(x)))):
        out, kept = saved_tensors(forward, x)
        hidden = sum(nbytes >= 2 * T * 40 * 4 for _, nbytes in kept)  # [2, T, 40] floats in any shape
        results.append((out, torch.autograd.grad(out, (x, *ffn.parameters()), grad), hidden))
    (out, grads, hidden), (want, want_grads, want_hidden) = results
    assert (hidden, want_hidden) == (0, 2)
    torch.testing.assert_close(out, want)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_only_later_blocks_see_the_compressed_slots() -> None:
    """E (keys) and F (values) reach every query after the first block, never one inside it."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 1, 2, 12, 4, generator=gen)
    e = f = pooling_projection(2, 4)
    base = block_causal_attention(q, k, v, e, f, 4)
    for changed in (block_causal_attention(q, k, v, e + 0.5, f, 4), block_causal_attention(q, k, v, e, f + 0.5, 4)):
        torch.testing.assert_close(changed[:, :, :4], base[:, :, :4])
        assert not torch.allclose(changed[:, :, 4:], base[:, :, 4:])


def test_pooling_projection_averages_equal_spans() -> None:
    assert pooling_projection(2, 4).tolist() == [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    assert torch.allclose(pooling_projection(3, 7).sum(-1), torch.ones(3))


def test_decoding_state_is_the_current_block_plus_slots() -> None:
    """After 21 tokens with block 8 and 2 slots: 2 completed blocks -> 4 slots, and 5 exact positions."""
    model = build_tiny("lumenspark").eval()
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.randint(37, (1, 13)), cache=cache)
        for _ in range(8):
            model(torch.randint(37, (1, 1)), cache=cache)
    state = cache.layers[0]
    assert state.slots_k.shape[2] == state.slots_v.shape[2] == 4 and state.k.shape[2] == state.v.shape[2] == 5
    # 32 tokens: 4 blocks -> 8 slots instead of 32 positions, a quarter of a full K/V cache
    mixer = model.blocks[0].mixer
    assert model.cache_bytes(32) == model.n_layer * 2 * mixer.n_kv_head * mixer.head_dim * 8 * 4


@pytest.mark.parametrize(("override", "message"), [
    (("model.k_per_block=9",), "1 <= k_per_block <= block, got block=8, k_per_block=9"),
    (("model.block=0",), "block must be >= 1, got 0"),
    (("model.q_rank=0",), "rank must be >= 1"),
])
def test_bad_lumenspark_settings_are_clear_errors(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_tiny("lumenspark", *override)


class PlainLinformer(BlockLinformerAttention):
    """The seed's attention: keys and values of the WHOLE sequence projected to k slots, no mask. Every
    slot mixes future tokens, so this must fail the generic causality check."""

    def __init__(self, mixer: BlockLinformerAttention, max_seq_len: int, k: int) -> None:
        torch.nn.Module.__init__(self)
        self.__dict__.update({n: getattr(mixer, n) for n in ("n_head", "n_kv_head", "head_dim", "dropout")})
        self.q, self.kv, self.proj, self.resid_dropout = mixer.q, mixer.kv, mixer.proj, mixer.resid_dropout
        self.e_full = torch.nn.Parameter(torch.randn(k, max_seq_len) / math.sqrt(max_seq_len))

    def forward(self, x, step, state=None):
        q, k, v = self.qkv(x)
        e = self.e_full[:, :x.shape[1]]
        k, v = e @ k, e @ v  # [B, Hkv, k, D]: a mix of all T positions
        return self.out(F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1]))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_generic_causality_check_catches_a_plain_linformer(mode: str) -> None:
    model = build_tiny("lumenspark")
    for block in model.blocks:
        block.mixer = PlainLinformer(block.mixer, model.max_seq_len, 8)
    with pytest.raises(AssertionError, match="saw tokens at"):
        assert_causal(model, "plain-linformer", mode)


def test_lumenspark_experiment_is_the_seed_model_and_sampling_preset(make_cfg) -> None:
    cfg = make_cfg("experiment=lumenspark_shakespeare")
    model = cfg.model
    assert (model.name, model.d_model, model.n_layer, model.n_head, model.max_seq_len) == ("lumenspark", 512, 6, 4, 512)
    assert (model.block, model.k_per_block, model.dropout, cfg.tokenizer.encoding) == (64, 16, 0.1, "gpt2")
    assert model.max_seq_len // model.block * model.k_per_block == 128  # the seed's k: 512 -> 128
    s = cfg.sampling
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (0.7, 50, 0.9, 1.2)
