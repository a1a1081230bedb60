"""EFFICIA-specific tests: the chunked LCP against a per-token reference, what each token may see at a
segment boundary (GMG, CCU, pooling), the FIFO after more than mem_size segments, decoding past
max_seq_len at constant memory. The generic contract (causality, cache == forward, cache bytes) over
the whole registry lives in test_models.py.
"""

from __future__ import annotations

import pytest
import torch

from efficia.errors import ConfigError
from efficia.models.efficia import EPS, feature_map, window_linear_attention
from tests.conftest import build_tiny

W, MEM = 8, 2  # conf/model_scale/efficia_tiny.yaml


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def naive_window_linear_attention(q, k, v, window):
    """Reference: one query at a time, its keys listed explicitly (queries bottom-right aligned)."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    rows = []
    for i in range(q_len):
        at = k_len - q_len + i
        keys = slice(max(0, at - window + 1), at + 1)
        weights = q[..., i:i + 1, :] @ k[..., keys, :].transpose(-1, -2)  # [B, H, 1, n]
        rows.append((weights @ v[..., keys, :]) / (weights.sum(-1, keepdim=True) + EPS))
    return torch.cat(rows, dim=-2)


@pytest.mark.parametrize(("q_len", "k_len", "window"), [(1, 1, 4), (1, 3, 4), (1, 4, 4), (5, 5, 4), (8, 8, 4),
                                                      (13, 13, 4), (3, 9, 4), (7, 10, 4), (2, 30, 4),
                                                      (21, 21, 1), (20, 20, 7), (9, 12, 16)])
def test_chunked_lcp_equals_per_token_reference(q_len, k_len, window):
    gen = torch.Generator().manual_seed(q_len * 100 + k_len)
    q = feature_map(torch.randn(2, 3, q_len, 5, generator=gen)).requires_grad_()
    k = feature_map(torch.randn(2, 3, k_len, 5, generator=gen)).requires_grad_()
    v = torch.randn(2, 3, k_len, 5, generator=gen, requires_grad=True)
    grad_out = torch.randn(2, 3, q_len, 5, generator=gen)
    out = window_linear_attention(q, k, v, window)
    ref = naive_window_linear_attention(q, k, v, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(ref, (q, k, v), grad_out),
                     strict=True):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


def tiny_mixer(*overrides: str):
    model = build_tiny("efficia", *overrides)
    mixer = model.blocks[0].mixer
    assert (mixer.window, mixer.mem_size) == (W, MEM)
    return mixer


def grad_rows(out: torch.Tensor, wrt: torch.Tensor, position: int) -> torch.Tensor:
    """|d out[:, position] / d wrt| summed over everything but wrt's dim 1 (segment or position)."""
    (grad,) = torch.autograd.grad(out[:, position].sum(), wrt, retain_graph=True)
    return grad.abs().sum(dim=[d for d in range(grad.dim()) if d != 1])


def test_memory_sees_only_the_last_mem_size_completed_segments():
    """GMG: the first token of segment s sees summaries s-MEM .. s-1; the last token of s-1 does not see s-1."""
    mixer = tiny_mixer()
    T = 5 * W
    x = torch.randn(2, T, mixer.d_model)
    summaries = torch.randn(2, T // W, mixer.gru.input_size, requires_grad=True)
    out = mixer.memory(x, summaries, 0, None)
    for s in range(1, T // W):
        first, last_before = grad_rows(out, summaries, s * W), grad_rows(out, summaries, s * W - 1)
        seen = [j for j in range(T // W) if first[j] > 0]
        assert seen == list(range(max(0, s - MEM), s)), f"first token of segment {s} sees summaries {seen}"
        assert last_before[s - 1] == 0, f"last token of segment {s - 1} sees its own segment's summary"


def test_compressed_state_changes_exactly_at_the_segment_boundary():
    """CCU: tokens of segment s read the GRU state after s-1: summary s-1 reaches the first token of s,
    never the last token of s-1."""
    mixer = tiny_mixer()
    T = 4 * W
    summaries = torch.randn(2, T // W, mixer.gru.input_size, requires_grad=True)
    out = mixer.recurrent(summaries, 0, T, None)
    for s in range(1, T // W):
        first, last_before = grad_rows(out, summaries, s * W), grad_rows(out, summaries, s * W - 1)
        assert (first[:s] > 0).all() and (first[s:] == 0).all(), f"segment {s}: {first}"
        assert (last_before[s - 1:] == 0).all(), f"last token of segment {s - 1} read summary {s - 1}"


def test_each_summary_pools_exactly_its_own_segment():
    mixer = tiny_mixer()
    with torch.no_grad():
        mixer.pool.normal_()  # not the uniform init: make the pooling weights position dependent
    T = 3 * W + 5
    x = torch.randn(2, T, mixer.d_model, requires_grad=True)
    summaries = mixer.summarise(x, 0, None)
    assert summaries.shape[1] == T // W  # the partial last segment has no summary yet
    for s in range(T // W):
        touched = grad_rows(summaries, x, s).nonzero().flatten().tolist()
        assert touched == list(range(s * W, (s + 1) * W)), f"summary {s} pooled positions {touched}"


def trained_like(model):
    """The tiny model with its zero-initialised pooling scores and initial state set at random, so the
    pooling weights differ within a segment (at init they are uniform) and every carried sum matters."""
    torch.manual_seed(11)
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.pool.normal_(0, 2.0)
            block.mixer.h0.normal_()
    return model.eval()


def test_fifo_keeps_the_last_mem_size_summaries_in_order():
    """After more than mem_size segments the FIFO holds exactly the memory keys/values of the last
    mem_size completed segments, oldest first (checked against the same segments summarised at once)."""
    model = trained_like(build_tiny("efficia"))
    T = 6 * W + 3
    idx = torch.randint(model.tok_emb.num_embeddings, (2, T), generator=torch.Generator().manual_seed(7))
    inputs = {}

    def record(module, args) -> None:
        inputs.setdefault("x", args[0])

    hook = model.blocks[1].mixer.register_forward_pre_hook(record)
    with torch.no_grad():
        model(idx)  # full forward: records block 1's mixer input
        hook.remove()
        cache = model.new_cache(2)
        for t in range(T):
            model(idx[:, t:t + 1], cache=cache)
        mixer, state = model.blocks[1].mixer, cache.layers[1]
        summaries = mixer.summarise(inputs["x"], 0, None)  # [B, 6, Cc]
        k, v = mixer.mem_kv(summaries).view(2, 6, 2, mixer.n_head, mixer.head_dim).permute(2, 0, 3, 1, 4)
    assert state.mem_k.shape[2] == state.mem_v.shape[2] == MEM
    torch.testing.assert_close(state.mem_k, k[:, :, -MEM:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.mem_v, v[:, :, -MEM:], atol=1e-5, rtol=1e-5)


def test_decoding_runs_past_max_seq_len_at_constant_memory():
    model = trained_like(build_tiny("efficia"))
    T = 3 * model.max_seq_len
    assert model.max_context is None
    idx = torch.randint(model.tok_emb.num_embeddings, (1, T), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(1)
        out = torch.cat([model(idx[:, t:t + 1], cache=cache) for t in range(T)], dim=1)
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)
    full_state = model.cache_bytes(W * MEM)  # ring and FIFO both full
    assert model.cache_bytes(T) == model.cache_bytes(10 ** 6) == full_state > model.cache_bytes(1)


def test_state_carries_across_calls_like_one_forward():
    """A prompt that ends mid-segment, then chunks that end on and across boundaries."""
    model = trained_like(build_tiny("efficia"))
    idx = torch.randint(model.tok_emb.num_embeddings, (2, 5 * W), generator=torch.Generator().manual_seed(9))
    cuts = [0, W - 3, W, 2 * W + 1, 2 * W + 2, 4 * W + 7, 5 * W]
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2)
        parts = [model(idx[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key", ["segment", "mem_size", "n_persistent", "compressed_dim", "conv_size"])
def test_bad_sizes_are_one_clear_error(key):
    with pytest.raises(ConfigError, match=f"model=efficia: {key} must be >= 1, got 0; set model.{key}"):
        build_tiny("efficia", f"model.{key}=0")


def test_small_experiment_is_the_seed_small_recipe(make_cfg):
    cfg = make_cfg("experiment=efficia_small")
    m = cfg.model
    assert (m.name, m.d_model, m.n_layer, m.n_head, m.compressed_dim, m.max_seq_len) == ("efficia", 128, 4, 4, 96, 512)
    assert (m.segment, m.mem_size, m.ffn_hidden) == (256, 512, 512)
    assert (cfg.data.seq_len, cfg.data.batch_size, cfg.optimizer.lr, cfg.tokenizer.kind) == (512, 64, 1e-4, "char")
