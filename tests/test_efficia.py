"""EFFICIA-specific tests: the chunked LCP against a per-token reference, what each token may see at a
segment boundary (GMG, CCU, pooling), the FIFO after more than mem_size segments, decoding past
max_seq_len at constant memory, and the model split by stage against the previous single
mixer class, kept at the end of this file as the reference, on trained-like weights. The generic contract
(causality, cache == forward, cache bytes) over the whole registry lives in test_models.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efficia.errors import ConfigError
from efficia.models.attention import RingKVState
from efficia.models.construction import check_heads, require
from efficia.models.decoder import Mixer, Step
from efficia.models.efficia import EPS, RENAMED, feature_map, window_linear_attention
from tests.conftest import build_tiny
from tests.trained_like import randomise

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
    assert (mixer.window, mixer.memory.mem_size) == (W, MEM)
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
    summaries = torch.randn(2, T // W, mixer.summary.compress.out_features, requires_grad=True)
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
    summaries = torch.randn(2, T // W, mixer.summary.compress.out_features, requires_grad=True)
    out = mixer.recurrence(summaries, 0, T, None)
    for s in range(1, T // W):
        first, last_before = grad_rows(out, summaries, s * W), grad_rows(out, summaries, s * W - 1)
        assert (first[:s] > 0).all() and (first[s:] == 0).all(), f"segment {s}: {first}"
        assert (last_before[s - 1:] == 0).all(), f"last token of segment {s - 1} read summary {s - 1}"


def test_each_summary_pools_exactly_its_own_segment():
    mixer = tiny_mixer()
    with torch.no_grad():
        mixer.summary.pool.normal_()  # not the uniform init: make the pooling weights position dependent
    T = 3 * W + 5
    x = torch.randn(2, T, mixer.d_model, requires_grad=True)
    summaries = mixer.summary(x, 0, None)
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
            block.mixer.summary.pool.normal_(0, 2.0)
            block.mixer.recurrence.h0.normal_()
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
        memory, state = model.blocks[1].mixer.memory, cache.layers[1].memory
        summaries = model.blocks[1].mixer.summary(inputs["x"], 0, None)  # [B, 6, Cc]
        k, v = memory.kv(summaries).view(2, 6, 2, memory.n_head, memory.head_dim).permute(2, 0, 3, 1, 4)
    assert state.k.shape[2] == state.v.shape[2] == MEM
    torch.testing.assert_close(state.k, k[:, :, -MEM:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.v, v[:, :, -MEM:], atol=1e-5, rtol=1e-5)


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


# ---- the model split by stage against a single-mixer reference ----

def previous_and_split(*overrides: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The tiny model with the previous mixer class, trained-like weights in float64, and the split model
    loaded from its state_dict: under the previous parameter names, through `RENAMED`."""
    previous = build_tiny("efficia", *overrides)
    for block in previous.blocks:
        m = block.mixer
        block.mixer = PreviousEfficiaMixer(m.d_model, m.local.n_head, m.window, m.memory.mem_size,
                                           m.memory.persistent.shape[0], m.summary.compress.out_features,
                                           m.local.conv_size, 0.0)
    previous = randomise(previous, seed).double().eval()
    split = build_tiny("efficia", *overrides).double().eval()
    split.load_state_dict(previous.state_dict())  # strict: every previous name maps to exactly one new one
    return previous, split


def split_name(name: str) -> str:
    head, mixer, local = name.partition("mixer.")
    return head + mixer + RENAMED.get(local, local) if mixer else name


def decode(model: nn.Module, idx: Tensor, cuts: list[int]) -> Tensor:
    cache = model.new_cache(idx.shape[0])
    with torch.no_grad():
        return torch.cat([model(idx[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)], dim=1)


def test_the_split_model_computes_the_previous_logits_and_gradients():
    """Same weights, same logits: the whole-sequence forward and its gradients (every parameter, under its
    previous name), single-token decoding and chunks that start and end inside and across segments."""
    previous, split = previous_and_split()
    T = 4 * W + 3
    idx = torch.randint(split.tok_emb.num_embeddings, (2, T), generator=torch.Generator().manual_seed(5))
    target = torch.randn(2, T, split.tok_emb.num_embeddings, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(6))
    out, ref = split(idx), previous(idx)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    (out * target).sum().backward()
    (ref * target).sum().backward()
    grads = dict(split.named_parameters())
    for name, p in previous.named_parameters():
        torch.testing.assert_close(grads[split_name(name)].grad, p.grad, atol=1e-9, rtol=1e-9, msg=name)
    for cuts in ([0, *range(1, T + 1)], [0, 3, W, W + 1, 3 * W - 2, T]):
        torch.testing.assert_close(decode(split, idx, cuts), decode(previous, idx, cuts), atol=1e-10, rtol=1e-10)


# ---- the previous formulation (one mixer class), kept as the reference ----

def previous_window_linear_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal sliding-window linear attention for features q[B,H,Tq,D] against k,v[B,H,Tk,D], Tk >= Tq,
    queries bottom-right aligned (query i sits at key Tk-Tq+i and sees keys within `window` back):

        out_i = sum_j (q_i·k_j) v_j / sum_j (q_i·k_j),   0 <= i - j < window

    Chunked, O(Tq·window): query chunk c (W queries) sees its own chunk under a causal [W, W] mask and
    the previous chunk under the complementary strict mask. Keys are zero-padded on the left to exactly
    W before the first query: a zero feature adds nothing to either sum, so padding is exact. A ones
    column on v yields the normaliser.
    """
    q_len, k_len, W = q.shape[-2], k.shape[-2], window
    ones = torch.ones_like(v[..., :1])
    v = torch.cat((v, ones), dim=-1)  # [B, H, Tk, D+1]: last column sums the weights
    if q_len == 1 and k_len <= W:  # decoding one token: every key is inside its band
        out = (q @ k.transpose(-1, -2)) @ v  # [B, H, 1, D+1]
        return out[..., :-1] / (out[..., -1:] + EPS)
    keep = min(k_len - q_len, W)  # history before the first query that can still be seen
    n = -(-q_len // W)
    pad_end = n * W - q_len
    B, H, _, D = q.shape
    k = F.pad(k[..., k_len - q_len - keep:, :], (0, 0, W - keep, pad_end)).view(B, H, n + 1, W, D)
    v = F.pad(v[..., k_len - q_len - keep:, :], (0, 0, W - keep, pad_end)).view(B, H, n + 1, W, D + 1)
    q = F.pad(q, (0, 0, 0, pad_end)).view(B, H, n, W, D)  # [B, H, n, W, D]: chunk c = key chunk c + 1
    own = torch.ones(W, W, device=q.device, dtype=torch.bool).tril()  # [W, W]: key r' <= query r
    out = (((q @ k[:, :, 1:].transpose(-1, -2)) * own) @ v[:, :, 1:]  # [B, H, n, W, D+1]
           + ((q @ k[:, :, :-1].transpose(-1, -2)) * ~own) @ v[:, :, :-1])  # previous chunk: r' > r
    out = out[..., :-1] / (out[..., -1:] + EPS)
    return out.reshape(B, H, n * W, D)[..., :q_len, :]


class PreviousState:
    """One layer's decoding state. Sizes are fixed from the start except the LCP ring (grows to
    `window` positions) and the FIFO (grows to `mem_size` entries): O(window + mem_size), not O(T)."""

    def __init__(self, mixer: PreviousEfficiaMixer, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        B, C = batch_size, mixer.d_model
        H, D = mixer.n_head, mixer.head_dim
        self.conv = torch.zeros(B, mixer.conv_size - 1, C, device=device, dtype=dtype)  # last conv inputs
        self.ring = RingKVState(mixer.window, B, H, D, device, dtype)  # phi(k), v of the last W positions
        self.pool_max = torch.full((B,), float("-inf"), device=device, dtype=dtype)  # partial segment:
        self.pool_sum = torch.zeros(B, C, device=device, dtype=dtype)  # online-softmax pooling sums
        self.pool_norm = torch.zeros(B, device=device, dtype=dtype)
        self.mem_k = torch.zeros(B, H, 0, D, device=device, dtype=dtype)  # FIFO, oldest first
        self.mem_v = torch.zeros_like(self.mem_k)
        self.gru = mixer.h0.detach().to(device=device, dtype=dtype).expand(B, -1).clone()  # [B, Cc]


class PreviousEfficiaMixer(Mixer):
    """LCP -> GMG -> CCU -> FF over one call's tokens (a whole sequence, or a cached continuation)."""

    def __init__(self, d_model: int, n_head: int, segment: int, mem_size: int, n_persistent: int,
                 compressed_dim: int, conv_size: int, dropout: float) -> None:
        super().__init__()
        check_heads(d_model, n_head)
        for key, value in (("segment", segment), ("mem_size", mem_size), ("n_persistent", n_persistent),
                           ("compressed_dim", compressed_dim), ("conv_size", conv_size)):
            require(value >= 1, f"model=efficia: {key} must be >= 1, got {value}; set model.{key}")
        C, Cc = d_model, compressed_dim
        self.d_model, self.n_head, self.head_dim = C, n_head, C // n_head
        self.window, self.mem_size, self.conv_size = segment, mem_size, conv_size  # window: the LCP band = segment
        self.conv = nn.Parameter(torch.randn(C, 1, conv_size) / conv_size ** 0.5)  # depthwise, causal
        self.lcp_qkv = nn.Linear(C, 3 * C, bias=False)
        self.gmg_qg = nn.Linear(C, 2 * C, bias=False)  # GMG query and gate
        self.persistent = nn.Parameter(torch.randn(n_persistent, Cc) * 0.02)  # learned memory slots
        self.mem_kv = nn.Linear(Cc, 2 * C, bias=False)  # a slot or summary -> memory key, value
        self.pool = nn.Parameter(torch.zeros(C))  # attention-pooling scores x·pool (zero: mean at init)
        self.compress = nn.Linear(C, Cc, bias=False)
        self.gru = nn.GRUCell(Cc, Cc)
        self.h0 = nn.Parameter(torch.zeros(Cc))  # learned initial CCU state (read by segment 0)
        self.ccu_out = nn.Linear(Cc, C, bias=False)
        self.fuse = nn.Linear(C, 3, bias=False)  # FF: per-position logits over (lcp, gmg, ccu)
        self.add_output(C, C, dropout)

    def forward(self, x: Tensor, step: Step, state: PreviousState | None = None) -> Tensor:
        B, T, C = x.shape
        W = self.window
        offset = step.start % W  # tokens of the current segment before this call
        lcp = self.local(x, step, state)
        summaries = self.summarise(x, offset, state)  # [B, n_new, Cc]: segments completed in this call
        gmg = self.memory(x, summaries, offset, state)
        ccu = self.recurrent(summaries, offset, T, state)
        # FF: softmax over the three streams at every position
        w = torch.softmax(self.fuse(x), dim=-1)  # [B, T, 3]
        fused = w[..., :1] * lcp + w[..., 1:2] * gmg + w[..., 2:] * ccu
        return self.out(fused)

    def recurrent(self, summaries: Tensor, offset: int, T: int, state: PreviousState | None) -> Tensor:
        """CCU: one GRUCell step per completed segment (a loop over segments, never over tokens);
        the tokens of segment s read the state after segment s-1 -> [B, T, C]."""
        B = summaries.shape[0]
        # a copy, not a view of the parameter: under no_grad a view still "requires grad" without a grad_fn,
        # which breaks autograd hooks such as the FLOP counter in Lightning's model summary
        h = state.gru.to(summaries.dtype) if state is not None else self.h0.to(summaries.dtype).repeat(B, 1)
        states = [h]  # states[j]: after segment s0 + j - 1
        for j in range(summaries.shape[1]):
            states.append(self.gru(summaries[:, j], states[-1]))
        if state is not None:
            state.gru = states[-1].detach().to(state.gru.dtype, copy=True)
        seg = (offset + torch.arange(T, device=summaries.device)) // self.window  # [T]: segment - s0
        return self.ccu_out(torch.stack(states, dim=1))[:, seg]  # [B, T, C]

    def local(self, x: Tensor, step: Step, state: PreviousState | None) -> Tensor:
        """LCP: causal depthwise conv (positions), then sliding-window linear attention."""
        B, T, C = x.shape
        H, D, K = self.n_head, self.head_dim, self.conv_size
        past = state.conv.to(x.dtype) if state is not None else x.new_zeros(B, K - 1, C)
        xp = torch.cat((past, x), dim=1)  # [B, K-1+T, C]
        if state is not None and K > 1:
            state.conv = xp[:, -(K - 1):].detach().to(state.conv.dtype, copy=True)
        if T == 1:  # decoding: a weighted sum of the last K inputs (conv1d's setup costs more)
            xc = (xp * self.conv[:, 0].t().to(x.dtype)).sum(dim=1, keepdim=True)  # [B, 1, C]
        else:
            xc = F.conv1d(xp.transpose(1, 2), self.conv.to(x.dtype), groups=C).transpose(1, 2)  # [B, T, C]
        q, k, v = self.lcp_qkv(xc).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
        q, k = feature_map(q), feature_map(k)
        if state is not None:
            k, v = state.ring.update(k, v, step.start)
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = previous_window_linear_attention(q, k, v, self.window)  # [B, H, T, D]
        return y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]

    def summarise(self, x: Tensor, offset: int, state: PreviousState | None) -> Tensor:
        """Learned attention pooling of every segment completed in this call -> [B, n_new, Cc].
        The partial segment's running (max, sum, norm) carry over in the state (online softmax)."""
        B, T, C = x.shape
        W = self.window
        n = -(-(offset + T) // W)  # segments this call touches
        n_new = (offset + T) // W  # ... of which completed
        pad = (offset, n * W - offset - T)
        acc = torch.promote_types(x.dtype, torch.float32)  # at least fp32 (a float64 model stays float64)
        xf = x.to(acc)
        score = F.pad(xf @ self.pool.to(acc), pad, value=float("-inf")).view(B, n, W)  # [B, n, W]
        xs = F.pad(xf, (0, 0, *pad)).view(B, n, W, C)  # [B, n, W, C]
        top = score.amax(dim=-1)  # [B, n], finite: every segment holds a token of this call
        if state is not None:  # fold the cached part of the first segment in
            top = torch.cat((torch.maximum(top[:, :1], state.pool_max.to(acc)[:, None]), top[:, 1:]), dim=1)
        weight = torch.exp(score - top[..., None])  # [B, n, W]
        total = torch.einsum("bnw,bnwc->bnc", weight, xs)  # [B, n, C]
        norm = weight.sum(dim=-1)  # [B, n]
        if state is not None:
            carry = torch.exp(state.pool_max.to(acc) - top[:, 0])  # [B]
            first_total = total[:, :1] + (carry[:, None] * state.pool_sum.to(acc))[:, None]
            first_norm = norm[:, :1] + (carry * state.pool_norm.to(acc))[:, None]
            total, norm = torch.cat((first_total, total[:, 1:]), 1), torch.cat((first_norm, norm[:, 1:]), 1)
            dtype = state.pool_sum.dtype
            if n > n_new:  # a partial segment remains
                state.pool_max = top[:, -1].to(dtype, copy=True)
                state.pool_sum = total[:, -1].to(dtype, copy=True)
                state.pool_norm = norm[:, -1].to(dtype, copy=True)
            else:
                state.pool_max = torch.full_like(state.pool_max, float("-inf"))
                state.pool_sum, state.pool_norm = torch.zeros_like(state.pool_sum), torch.zeros_like(state.pool_norm)
        pooled = total[:, :n_new] / norm[:, :n_new, None]  # [B, n_new, C]
        return self.compress(pooled.to(x.dtype))

    def memory(self, x: Tensor, summaries: Tensor, offset: int, state: PreviousState | None) -> Tensor:
        """GMG: each token attends over the persistent slots and the memory of the (at most mem_size)
        segments completed before its own, computed per query segment: O(T·(n_persistent + mem_size))."""
        B, T, C = x.shape
        H, D, W = self.n_head, self.head_dim, self.window
        q, gate = self.gmg_qg(x).split(C, dim=-1)
        k_new, v_new = self.mem_kv(summaries).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4)  # [B, H, n_new, D]
        if state is not None:
            k_all = torch.cat((state.mem_k.to(x.dtype), k_new), dim=2)  # [B, H, n_f + n_new, D]
            v_all = torch.cat((state.mem_v.to(x.dtype), v_new), dim=2)
            n_f = state.mem_k.shape[2]
            keep = min(self.mem_size, k_all.shape[2])
            state.mem_k = k_all[:, :, k_all.shape[2] - keep:].detach().to(state.mem_k.dtype, copy=True)
            state.mem_v = v_all[:, :, v_all.shape[2] - keep:].detach().to(state.mem_v.dtype, copy=True)
        else:
            k_all, v_all, n_f = k_new, v_new, 0
        n_e = k_all.shape[2]  # entry e is the memory of segment s0 - n_f + e
        n = -(-(offset + T) // W)  # query segments s0 .. s0+n-1
        L = min(self.mem_size, n_e)  # entries any one segment can see
        # query segment j sees entries n_f+j-L .. n_f+j-1 (padded index n_f+j .. n_f+j+L-1)
        k_win, v_win = (F.pad(t, (0, 0, L, 0)).unfold(2, L, 1)[:, :, n_f:n_f + n].transpose(-1, -2) if L
                        else t.new_zeros(B, H, n, 0, D) for t in (k_all, v_all))  # [B, H, n, L, D]
        slot_k, slot_v = self.mem_kv(self.persistent.to(x.dtype)).view(-1, 2, H, D).permute(1, 2, 0, 3)  # [H,P,D]
        P = slot_k.shape[1]
        k_win = torch.cat((slot_k[None, :, None].expand(B, H, n, P, D), k_win), dim=3)  # [B, H, n, P+L, D]
        v_win = torch.cat((slot_v[None, :, None].expand(B, H, n, P, D), v_win), dim=3)
        entry = n_f + torch.arange(n, device=x.device)[:, None] - L + torch.arange(L, device=x.device)  # [n, L]
        mask = torch.cat((entry.new_ones(n, P, dtype=torch.bool), entry >= 0), dim=1)[:, None]  # [n, 1, P+L]
        q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        if n > 1:  # group queries by segment: [B, H, n, W, D]
            q = F.pad(q, (0, 0, offset, n * W - offset - T)).view(B, H, n, W, D)
        else:
            q = q[:, :, None]  # [B, H, 1, T, D]
        y = F.scaled_dot_product_attention(q, k_win, v_win, attn_mask=mask)  # [B, H, n, W or T, D]
        y = y.reshape(B, H, -1, D)[:, :, offset:offset + T] if n > 1 else y[:, :, 0]  # [B, H, T, D]
        return torch.sigmoid(gate) * y.transpose(1, 2).reshape(B, T, C)

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> PreviousState:
        return PreviousState(self, batch_size, device, dtype)

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        C = self.d_model
        numbers = ((self.conv_size - 1) * C + 2 * C * min(seq_len, self.window) + (C + 2)
                   + 2 * C * min(seq_len // self.window, self.mem_size) + self.h0.numel())
        return numbers * dtype.itemsize



# ---- the long-context formulations against the direct ones, trained-like weights ----

@pytest.mark.parametrize(("q_len", "k_len", "window"), [(1, 1, 4), (1, 4, 4), (1, 9, 4), (8, 8, 4), (13, 13, 4),
                                                      (7, 10, 4), (2, 30, 4), (21, 21, 1), (64, 64, 16)])
def test_lcp_equals_the_previous_formulation(q_len, k_len, window):
    """In-place masked score blocks and a summed normaliser against the previous masked copies and ones
    column: whole and partial chunks, single-token and chunked cached shapes (Tk > Tq), forward and gradients."""
    gen = torch.Generator().manual_seed(q_len * 100 + k_len)
    q = feature_map(2 * torch.randn(2, 3, q_len, 8, generator=gen, dtype=torch.float64)).requires_grad_()
    k = feature_map(2 * torch.randn(2, 3, k_len, 8, generator=gen, dtype=torch.float64)).requires_grad_()
    v = (2 * torch.randn(2, 3, k_len, 8, generator=gen, dtype=torch.float64)).requires_grad_()
    grad_out = torch.randn(2, 3, q_len, 8, generator=gen, dtype=torch.float64)
    out, ref = window_linear_attention(q, k, v, window), previous_window_linear_attention(q, k, v, window)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for g, rg in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(ref, (q, k, v), grad_out),
                     strict=True):
        torch.testing.assert_close(g, rg, atol=1e-12, rtol=1e-12)


def stage_pair(*overrides: str):
    """Block 0's previous mixer and split mixer, trained-like float64 weights (the same values)."""
    previous, split = previous_and_split(*overrides)
    return previous.blocks[0].mixer, split.blocks[0].mixer


def previous_params(previous: nn.Module, stage: str) -> dict[str, Tensor]:
    """The previous mixer's parameters that the split mixer's `stage` holds, under their names there."""
    return {RENAMED[name].removeprefix(stage + "."): p for name, p in previous.named_parameters()
            if RENAMED.get(name, "").startswith(stage + ".")}


def assert_same_grads(out: Tensor, ref: Tensor, inputs: tuple[Tensor, ...], params: dict[str, Tensor],
                      ref_params: dict[str, Tensor], gen: torch.Generator) -> None:
    """Gradients of the inputs and of every parameter of a stage (none unused on one side only)."""
    assert params.keys() == ref_params.keys()
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    names = list(params)
    got = torch.autograd.grad(out, (*inputs, *(params[k] for k in names)), grad_out, allow_unused=True)
    want = torch.autograd.grad(ref, (*inputs, *(ref_params[k] for k in names)), grad_out, allow_unused=True)
    for name, g, rg in zip([f"input {i}" for i in range(len(inputs))] + names, got, want, strict=True):
        assert (g is None) == (rg is None), name
        if g is not None:
            torch.testing.assert_close(g, rg, atol=1e-10, rtol=1e-10, msg=name)


# (T, offset, FIFO entries held) x mem_size: whole and partial segments, more blocks of segments than one
# (T > mem_size segments), cached calls that start inside a segment with a full or partial FIFO
MEMORY_CASES = [(5 * W, 0, 0), (5 * W + 3, 0, 0), (7 * W, 0, MEM), (1, 5, MEM), (3, 2, 1), (1, 0, 0),
                (2 * W + 5, 3, 1), (W - 3, 3, MEM), (W, 0, 0)]


@pytest.mark.parametrize("mem_size", [MEM, 3, 16])
@pytest.mark.parametrize(("T", "offset", "n_f"), MEMORY_CASES)
def test_gmg_equals_the_previous_formulation(T, offset, n_f, mem_size):
    """One fused 4-D SDPA over blocks of segments against the previous 5-D masked SDPA: output, the FIFO it
    leaves, and the gradients of x, the summaries and the stage's weights."""
    previous, split = stage_pair(f"model.mem_size={mem_size}")
    memory, n_f = split.memory, min(n_f, mem_size)
    B, C, Cc = 2, split.d_model, memory.persistent.shape[1]
    gen = torch.Generator().manual_seed(T * 10 + offset)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64, requires_grad=True)
    summaries = torch.randn(B, (offset + T) // W, Cc, generator=gen, dtype=torch.float64, requires_grad=True)
    state, old_state = (None, None)
    if n_f or offset:
        state, old_state = memory.new_state(B, x.device, x.dtype), previous.new_state(B, x.device, x.dtype)
        state.k, state.v = (torch.randn(B, memory.n_head, n_f, memory.head_dim, generator=gen, dtype=x.dtype)
                            for _ in range(2))
        old_state.mem_k, old_state.mem_v = state.k, state.v
    out = memory(x, summaries, offset, state)
    ref = previous.memory(x, summaries, offset, old_state)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    if state is not None:
        torch.testing.assert_close((state.k, state.v), (old_state.mem_k, old_state.mem_v), atol=0, rtol=0)
    inputs = (x, summaries) if summaries.numel() else (x,)
    assert_same_grads(out, ref, inputs, dict(memory.named_parameters()), previous_params(previous, "memory"), gen)


@pytest.mark.parametrize(("n_new", "offset", "cached"), [(0, 3, True), (1, 0, True), (1, 5, True), (6, 0, False),
                                                         (6, 2, True), (1, 0, False)])
def test_ccu_equals_the_previous_formulation(n_new, offset, cached):
    """One nn.GRU call against the previous GRUCell loop: the per-token states, the state left for the next
    call, and the gradients of the summaries, the GRU weights, h0 and the output projection."""
    previous, split = stage_pair()
    recurrence = split.recurrence
    B, Cc = 2, recurrence.h0.numel()
    T = n_new * W + 3 - offset if n_new else W - 1 - offset
    gen = torch.Generator().manual_seed(n_new * 10 + offset)
    summaries = torch.randn(B, n_new, Cc, generator=gen, dtype=torch.float64, requires_grad=True)
    state = old_state = None
    if cached:
        state, old_state = recurrence.new_state(B, summaries.device, summaries.dtype), previous.new_state(
            B, summaries.device, summaries.dtype)
        state.h = old_state.gru = torch.randn(B, Cc, generator=gen, dtype=summaries.dtype)
    out = recurrence(summaries, offset, T, state)
    ref = previous.recurrent(summaries, offset, T, old_state)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    if cached:
        torch.testing.assert_close(state.h, old_state.gru, atol=1e-12, rtol=1e-12)
    assert_same_grads(out, ref, (summaries,) if n_new else (), dict(recurrence.named_parameters()),
                      previous_params(previous, "recurrence"), gen)


def saved_for_backward(mixer: nn.Module, x: Tensor) -> float:
    """Bytes one training forward of `mixer` keeps for backward, in units of its input x[B, T, C]."""
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mixer(x, Step(0, x.shape[1], x.device))
    return sum(kept.values()) / (x.numel() * x.element_size())


def test_training_keeps_few_activations_per_mixer():
    """In training the LCP and GMG keep only their inputs and output for backward (their score
    blocks, padded and regrouped copies are recomputed in backward), so a mixer keeps under 10 tensors the
    size of its input (x, the three streams, the fused sum, the pooling's segment view, ...), about 25 without."""
    mixer = tiny_mixer()
    x = torch.randn(2, 32 * W, mixer.d_model, requires_grad=True)
    assert saved_for_backward(mixer, x) < 10


@pytest.mark.parametrize(("start", "T"), [(0, 5 * W + 3), (0, 1), (3, 1), (2 * W + 5, 1), (W - 2, 2 * W + 1)])
def test_lcp_stage_equals_the_previous_formulation(start, T):
    """The LCP stage (K shifted products for the depthwise conv, the rewritten chunked attention) against the
    previous conv1d and masked-copy formulation: whole sequences and cached calls after `start` tokens
    (conv tail and ring carried), forward, the state left behind and the gradients."""
    previous, split = stage_pair()
    local, B = split.local, 2
    gen = torch.Generator().manual_seed(start * 10 + T)
    past = torch.randn(B, start, split.d_model, generator=gen, dtype=torch.float64)
    x = torch.randn(B, T, split.d_model, generator=gen, dtype=torch.float64, requires_grad=True)
    state = old_state = None
    if start:
        state, old_state = local.new_state(B, x.device, x.dtype), previous.new_state(B, x.device, x.dtype)
        with torch.no_grad():
            local(past, Step(0, start, x.device), state)
            previous.local(past, Step(0, start, x.device), old_state)
    out = local(x, Step(start, T, x.device), state)
    ref = previous.local(x, Step(start, T, x.device), old_state)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    if start:
        torch.testing.assert_close((state.conv, state.ring.k, state.ring.v),
                                   (old_state.conv, old_state.ring.k, old_state.ring.v), atol=1e-12, rtol=1e-12)
    assert_same_grads(out, ref, (x,), dict(local.named_parameters()), previous_params(previous, "local"), gen)
