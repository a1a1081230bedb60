"""YingGem-specific tests: banded attention against a dense reference, the rolling KV cache, flags.

The generic causality / cache-equals-forward tests over the whole registry live in test_models.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from efficia.build import build_model
from efficia.models import kernels
from efficia.models.layers import GatedFeedForward, LeanGatedFeedForward, apply_rope, rope_tables
from tests.conftest import build_tiny
from tests.memory import saved_tensors
from tests.trained_like import randomise

WINDOW = 8  # conf/model_scale/yinggem_tiny.yaml
MAX_SEQ_LEN = 16
N_LAYER = 2
VOCAB = 61


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def dense_band_attention(q, k, v, window, dropout=0.0):
    """Reference: explicit [Tq, Tk] band mask, queries bottom-right aligned, plain softmax."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    q_pos = torch.arange(k_len - q_len, k_len)[:, None]
    distance = q_pos - torch.arange(k_len)[None, :]
    allowed = (distance >= 0) & (distance < window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def tiny_model(seed: int = 0, *overrides: str):
    model = build_tiny("yinggem", f"model.max_seq_len={MAX_SEQ_LEN}", *overrides, vocab_size=VOCAB, seed=seed)
    assert (model.window, model.n_layer) == (WINDOW, N_LAYER)
    return model.eval()


@torch.no_grad()
def reference_logits(model, idx, window=WINDOW):
    """The ground truth: the model's forward computed here from its own embedding, norms, projections and
    feed-forwards, with attention as `dense_band_attention` at the test's own `window` (no kernel of
    efficia.models.kernels, no cache): RoPE at positions 0..T-1, each K/V head repeated for its query heads."""
    B, T = idx.shape
    x = model.tok_emb(idx)
    for block in model.blocks:
        mixer = block.mixer
        H, Hkv, D = mixer.n_head, mixer.n_kv_head, mixer.head_dim
        q, k, v = mixer.qkv(block.norm1(x)).view(B, T, H + 2 * Hkv, D).transpose(1, 2).split((H, Hkv, Hkv), dim=1)
        cos, sin = rope_tables(D, mixer.rope_theta, 0, T, idx.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        x = x + mixer.out(dense_band_attention(q, k, v, window))
        x = x + block.ffn(block.norm2(x))
    return model.lm_head(model.norm(x))


# --- (a) the fast path equals the dense reference ------------------------------------------------


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (5, 5), (8, 8), (9, 9), (16, 16), (21, 21), (37, 37),
                                         (1, 8), (3, 10), (5, 12), (9, 16), (4, 30), (17, 30), (24, 31)])
def test_banded_attention_matches_dense_forward_and_grad(q_len, k_len):
    torch.manual_seed(q_len * 100 + k_len)
    q = torch.randn(2, 3, q_len, 16, requires_grad=True)
    k = torch.randn(2, 3, k_len, 16, requires_grad=True)
    v = torch.randn(2, 3, k_len, 16, requires_grad=True)
    grad_out = torch.randn(2, 3, q_len, 16)
    out = kernels.sliding_window_attention(q, k, v, WINDOW)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = dense_band_attention(q, k, v, WINDOW)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 16])
def test_banded_attention_other_windows(window):
    torch.manual_seed(window)
    q, k, v = (torch.randn(1, 2, 41, 8) for _ in range(3))
    torch.testing.assert_close(kernels.sliding_window_attention(q, k, v, window),
                               dense_band_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_banded_attention_is_not_full_causal():
    """The reference really is a band: a full causal attention must differ (the seed's leak class)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(kernels.sliding_window_attention(q, k, v, WINDOW), full, atol=1e-3)


def test_chunked_path_never_builds_a_long_score_matrix(monkeypatch):
    """O(T·window): no SDPA call in the training path sees more than 2·window keys."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(k.shape[-2])
        mask = kwargs.get("attn_mask")
        assert mask is None or mask.numel() <= WINDOW * 2 * WINDOW
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = (torch.randn(1, 2, 200, 8) for _ in range(3))
    kernels.sliding_window_attention(q, k, v, WINDOW)
    assert seen and max(seen) <= 2 * WINDOW


def test_training_after_inference_mode_call():
    """Masks cached under inference_mode (e.g. a validation sanity check) must not break training."""
    q, k, v = (torch.randn(1, 2, 3 * WINDOW + 1, 8, requires_grad=True) for _ in range(3))
    with torch.inference_mode():
        kernels.sliding_window_attention(q.detach(), k.detach(), v.detach(), WINDOW)
    kernels.sliding_window_attention(q, k, v, WINDOW).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_flex_path_matches_dense_inference():
    """The CUDA FlexAttention path's block mask, checked on CPU in inference (FlexAttention run eagerly)."""
    if kernels.flex_attention is None:
        pytest.skip("FlexAttention not available in this torch")
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    with torch.no_grad():
        out = kernels.flex_attention(q, k, v, block_mask=kernels.sliding_window_block_mask(40, WINDOW, q.device))
    torch.testing.assert_close(out, dense_band_attention(q, k, v, WINDOW), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [5, WINDOW, 21])
@pytest.mark.parametrize("n_kv_head", [None, 1])
def test_model_forward_matches_dense_reference(T, n_kv_head):
    model = tiny_model(0, f"model.n_kv_head={n_kv_head or 'null'}")
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        out = model(idx)
    torch.testing.assert_close(out, reference_logits(model, idx), atol=1e-5, rtol=1e-5)


def test_the_reference_comparison_can_fail():
    """The comparison sees the band's width: the reference one key wider is not the model."""
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        out = model(idx)
    assert not torch.allclose(out, reference_logits(model, idx, WINDOW + 1), atol=1e-3)


def test_receptive_field_is_bounded_by_the_window():
    """Through n_layer layers a token reaches at most n_layer·(window-1) positions ahead."""
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (1, 30))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    reach = N_LAYER * (WINDOW - 1)
    assert not torch.allclose(a[0, reach], b[0, reach])  # still reachable
    torch.testing.assert_close(a[0, reach + 1:], b[0, reach + 1:], atol=0, rtol=0)


# --- (b) rolling-cache decoding equals the full forward ------------------------------------------


def decode(model, idx, chunks):
    cache = model.new_cache(idx.shape[0])
    outs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(model(idx[:, start:start + n], cache=cache))
            start += n
    assert start == idx.shape[1] and cache.pos == start
    return torch.cat(outs, dim=1), cache


def test_decode_one_token_at_a_time_for_three_windows():
    model = tiny_model()
    T = 3 * WINDOW  # also past max_seq_len (16)
    idx = torch.randint(0, VOCAB, (2, T))
    out, _ = decode(model, idx, [1] * T)
    torch.testing.assert_close(out, reference_logits(model, idx), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunks", [[13] + [1] * 11, [WINDOW] + [1] * 8, [5, 3, 11, 1, 1, 2, 9],
                                    [1, 1, 20, 1], [30]])
def test_prefill_and_chunked_cached_calls(chunks):
    model = tiny_model(3)
    idx = torch.randint(0, VOCAB, (2, sum(chunks)))
    out, _ = decode(model, idx, chunks)
    torch.testing.assert_close(out, reference_logits(model, idx), atol=1e-4, rtol=1e-4)


def test_decoding_far_beyond_max_seq_len():
    """Positions are absolute and unbounded: decode past 4·max_seq_len, compare the tail."""
    model = tiny_model(4)
    assert model.max_context is None
    T = 4 * MAX_SEQ_LEN + 5
    idx = torch.randint(0, VOCAB, (1, T))
    out, cache = decode(model, idx, [20] + [1] * (T - 20))
    assert cache.pos == T
    ref = reference_logits(model, idx)
    torch.testing.assert_close(out[:, -WINDOW:], ref[:, -WINDOW:], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out).all()


# --- (c) constant cache memory -------------------------------------------------------------------


def test_cache_memory_is_constant():
    """Once the ring is full its memory never grows, and single-token steps write in place."""
    model = tiny_model()
    cache = model.new_cache(2)
    tensors = lambda: [t for state in cache.layers for t in (state.k, state.v)]
    size = lambda: sum(t.numel() * t.element_size() for t in tensors())
    assert model.cache_bytes(10**6) == model.cache_bytes(WINDOW) == WINDOW * model.cache_bytes(1)
    idx = torch.randint(0, VOCAB, (2, 3 * WINDOW))
    with torch.no_grad():
        model(idx[:, :WINDOW + 2], cache=cache)
        full, ptrs = size(), [t.data_ptr() for t in tensors()]
        assert full == 2 * model.cache_bytes(WINDOW)
        for t in range(WINDOW + 2, 3 * WINDOW):
            model(idx[:, t:t + 1], cache=cache)
            assert size() == full
    assert [t.data_ptr() for t in tensors()] == ptrs
    assert all(t.shape[-2] == WINDOW for t in tensors())


# --- (d) flags -----------------------------------------------------------------------------------


def test_attention_bias_flag():
    with_bias, without = tiny_model(0, "model.attention_bias=true"), tiny_model(0, "model.attention_bias=false")
    d = with_bias.d_model
    assert with_bias.num_params() - without.num_params() == N_LAYER * 4 * d
    assert all(m.bias is None for m in without.modules() if isinstance(m, torch.nn.Linear))
    idx = torch.randint(0, VOCAB, (1, 20))
    assert torch.isfinite(without(idx)).all()


def loss_and_grads(model, idx):
    model.train()
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_loss_and_grads():
    idx = torch.randint(0, VOCAB, (2, 21))
    plain = tiny_model(5)
    ckpt = tiny_model(5, "model.gradient_checkpointing=true")
    ckpt.load_state_dict(plain.state_dict())
    loss_a, grads_a = loss_and_grads(plain, idx)
    loss_b, grads_b = loss_and_grads(ckpt, idx)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_a.values())


def test_seed_size_parameter_count():
    """Seed sizes with GPT-2 vocab: about 134M (untied head). Built on the meta device: no memory."""
    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf/model/yinggem.yaml"))
    with torch.device("meta"):
        model = build_model(cfg, 50257)
    assert 133e6 < model.num_params() < 135e6
    assert model.cache_bytes(10**6) == 2 * 12 * 768 * 512 * 4


def test_seed_size_parameter_count_matches_the_seed() -> None:
    """The seed README states about 133.96M parameters with the GPT-2 vocabulary."""
    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "yinggem.yaml"))
    with torch.device("meta"):
        model = build_model(cfg, 50257)
    assert abs(model.num_params() / 133.96e6 - 1) < 0.005, model.num_params()


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_lean_gated_feed_forward_is_the_gated_one_keeping_two_hidden_activations(activation):
    """Same parameters, outputs and gradients as GatedFeedForward, on trained-like weights; backward keeps
    gate(x) and up(x) only (the plain one also keeps act(gate(x)) and the product)."""
    torch.manual_seed(0)
    lean = LeanGatedFeedForward(16, 24, activation)
    plain = GatedFeedForward(16, 24, activation)
    randomise(lean)
    plain.load_state_dict(lean.state_dict())
    x = torch.randn(2, 7, 16, requires_grad=True)
    grad = torch.randn(2, 7, 16)
    results = []
    for ffn in (lean, plain):
        out, kept = saved_tensors(ffn, x)
        hidden = sum(nbytes == 2 * 7 * 24 * 4 for _, nbytes in kept)  # [2, 7, 24] floats, in any shape
        results.append((out, torch.autograd.grad(out, (x, *ffn.parameters()), grad), hidden))
    (out, grads, hidden), (want, want_grads, want_hidden) = results
    assert (hidden, want_hidden) == (2, 4)
    torch.testing.assert_close(out, want)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_banded_attention_keeps_no_copy_of_the_key_windows_for_a_batch():
    """Batch > 1: nothing kept for backward is larger than one [B, H, T, D] tensor (reshaping the overlapping
    unfold view of strided keys would keep a 2x copy of keys and values, every key in two windows)."""
    qkv = torch.randn(2, 12 * WINDOW, 3 * 4, 8, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.split(4, dim=2))  # [B, H, T, D] views, as the mixer passes them
    out, kept = saved_tensors(kernels.sliding_window_attention, q, k, v, WINDOW)
    one = q.numel() * q.element_size()
    assert max(nbytes for shape, nbytes in kept if shape != (2, 4, WINDOW, 8)) <= one  # the input's own storage aside
    torch.testing.assert_close(out, dense_band_attention(q, k, v, WINDOW), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [64, 300])
def test_flex_attention_equals_chunked_on_cuda(T):
    """Where a GPU exists: the compiled FlexAttention path and the chunked path agree, forward and backward."""
    torch.manual_seed(T)
    q, k, v = (torch.randn(2, 4, T, 32, device="cuda", requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 4, T, 32, device="cuda")
    flex = kernels.flex_sliding_window_attention(q, k, v, 16)
    chunked = kernels.chunked_sliding_window_attention(q, k, v, 16)
    torch.testing.assert_close(flex, chunked, atol=2e-3, rtol=2e-3)
    for a, b in zip(torch.autograd.grad(flex, (q, k, v), grad_out), torch.autograd.grad(chunked, (q, k, v), grad_out),
                    strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
