"""`efficia`: EFFICIA-1, a segment-recurrent block, causal by construction and linear in T.

The sequence is cut into segments of `segment` tokens (segment s = positions s·W .. s·W+W-1, W = segment);
the LCP's sliding window is the segment length too.
One mixer per block holds the four stages, one small module each with its own slice of the decoding state;
the block adds a SwiGLU after it:

    x ─┬─ LocalAttention: causal depthwise conv ─ q,k,v ─ sliding-window linear attention (elu+1) ─ lcp ─┐
       ├─ GlobalMemory: q ─ softmax over [n_persistent slots | summaries of segments s-mem_size..s-1]  │
       │       · sigmoid gate ──────────────────────────────────────────────────────────────── gmg ─┼─ fusion
       └─ Recurrence: GRU state after segment s-1 (one GRU step per completed segment) ─────── ccu ─┘  (mixer)
    completed segment ── SegmentSummary: attention pooling, compress ─┬─ GlobalMemory: key/value (FIFO)
                                                                      └─ Recurrence: GRU input

Fusion is the mixer's own forward: a per-position softmax over the three streams, then the output projection.

Causality: a token at position i sees keys i-W+1..i in the LCP (causal inside a window too), and only
summaries of segments that ended before its own segment began in the GMG and the CCU (never a pooling of
the whole sequence).

Each stage runs one code path for training and decoding: it reads its state slice (None in training:
the initial values), computes over the call's tokens, and writes the slice back when there is one.
Decoding state per layer (`EfficiaState`), constant in T once full: the conv's last inputs and the LCP's
features of the last `window` positions (`LocalState`), the running pooling sums of the partial segment
(`PoolState`), the FIFO of at most `mem_size` memory keys/values (`MemoryState`), the GRU state
(`RecurrentState`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from efficia.models.attention import RingKVState
from efficia.models.construction import KeepsPreviousNames, check_heads, require
from efficia.models.decoder import GATED_FFN_MATRICES, DecoderLM, Mixer, Step
from efficia.models.kernels import sdpa
from efficia.models.layers import RMSNorm, SwiGLU
from efficia.models.registry import register

EPS = 1e-6  # linear-attention normaliser floor


def feature_map(x: Tensor) -> Tensor:
    """elu+1: a positive feature map, so the normaliser phi(q)·sum phi(k) is never zero."""
    return F.elu(x) + 1


def window_linear_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal sliding-window linear attention for features q[B,H,Tq,D] against k,v[B,H,Tk,D], Tk >= Tq,
    queries bottom-right aligned (query i sits at key Tk-Tq+i and sees keys within `window` back):

        out_i = sum_j (q_i·k_j) v_j / sum_j (q_i·k_j),   0 <= i - j < window

    Chunked, O(Tq·window), one path for training and decoding: query chunk c (W queries) sees its own
    chunk's keys r' <= r and the previous chunk's keys r' > r. Keys are zero-padded on the left to exactly
    W before the first query: a zero feature adds nothing to either sum, so padding is exact. Each [W, W]
    score block is masked in place (tril_/triu_: no masked copy) and summed over its keys for the normaliser.
    """
    q_len, k_len, W = q.shape[-2], k.shape[-2], window
    if q_len == 1 and k_len <= W:  # decoding one token: every key is inside its band (no padding to 2W keys)
        scores = q @ k.transpose(-1, -2)  # [B, H, 1, Tk]
        return (scores @ v) / (scores.sum(dim=-1, keepdim=True) + EPS)
    keep = min(k_len - q_len, W)  # history before the first query that can still be seen
    n = -(-q_len // W)
    pad = (0, 0, W - keep, n * W - q_len)
    B, H, _, D = q.shape
    k, v = (F.pad(t[..., k_len - q_len - keep:, :], pad).view(B, H, n + 1, W, D) for t in (k, v))
    q = F.pad(q, (0, 0, 0, pad[-1])).view(B, H, n, W, D)  # [B, H, n, W, D]: chunk c = key chunk c + 1
    own = (q @ k[:, :, 1:].transpose(-1, -2)).tril_()  # [B, H, n, W, W]: own chunk, key r' <= query r
    prev = (q @ k[:, :, :-1].transpose(-1, -2)).triu_(1)  # previous chunk: r' > r
    out = own @ v[:, :, 1:] + prev @ v[:, :, :-1]  # [B, H, n, W, D]
    norm = own.sum(dim=-1, keepdim=True) + prev.sum(dim=-1, keepdim=True)
    return (out / (norm + EPS)).view(B, H, n * W, D)[..., :q_len, :]


class LocalState:
    """LCP: the conv's last `conv_size - 1` inputs and a ring of phi(k), v over the last `window` positions."""

    def __init__(self, stage: LocalAttention, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        B, C, H, D = batch_size, stage.d_model, stage.n_head, stage.head_dim
        self.conv = torch.zeros(B, stage.conv_size - 1, C, device=device, dtype=dtype)
        self.ring = RingKVState(stage.window, B, H, D, device, dtype)


class LocalAttention(nn.Module):
    """LCP: causal depthwise conv (its positional information), then sliding-window linear attention."""

    def __init__(self, d_model: int, n_head: int, window: int, conv_size: int) -> None:
        super().__init__()
        C = d_model
        self.d_model, self.n_head, self.head_dim = C, n_head, C // n_head
        self.window, self.conv_size = window, conv_size
        self.conv = nn.Parameter(torch.randn(C, 1, conv_size) / conv_size ** 0.5)  # depthwise, causal
        self.qkv = nn.Linear(C, 3 * C, bias=False)

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LocalState:
        return LocalState(self, batch_size, device, dtype)

    def state_numbers(self, seq_len: int) -> int:
        return (self.conv_size - 1) * self.d_model + 2 * self.d_model * min(seq_len, self.window)

    def forward(self, x: Tensor, step: Step, state: LocalState | None = None) -> Tensor:
        B, T, C = x.shape
        H, D, K = self.n_head, self.head_dim, self.conv_size
        past = state.conv.to(x.dtype) if state is not None else x.new_zeros(B, K - 1, C)
        xp = torch.cat((past, x), dim=1)  # [B, K-1+T, C]
        taps = self.conv[:, 0].t().to(x.dtype)  # [K, C]: tap j weighs the input K-1-j positions back
        # the depthwise conv as K shifted products: one path for any T (conv1d's setup is ~0.4 ms a call,
        # more than a whole decoding step of this stage)
        xc = sum(xp[:, j:j + T] * taps[j] for j in range(K))  # [B, T, C]
        q, k, v = self.qkv(xc).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
        q, k = feature_map(q), feature_map(k)
        if state is not None:
            state.conv = xp[:, T:].detach().to(state.conv.dtype, copy=True)  # the last K-1 inputs
            k, v = (t.to(q.dtype) for t in state.ring.update(k, v, step.start))
        y = window_linear_attention(q, k, v, self.window)  # [B, H, T, D]
        return y.transpose(1, 2).reshape(B, T, C)


class PoolState:
    """The partial segment's online-softmax pooling sums (running max, weighted sum, normaliser)."""

    def __init__(self, stage: SegmentSummary, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        B, C = batch_size, stage.pool.numel()
        self.max = torch.full((B,), float("-inf"), device=device, dtype=dtype)
        self.sum = torch.zeros(B, C, device=device, dtype=dtype)
        self.norm = torch.zeros(B, device=device, dtype=dtype)


class SegmentSummary(nn.Module):
    """Learned attention pooling of every segment completed in a call, compressed to `compressed_dim`:
    what the memory FIFO stores and the GRU reads."""

    def __init__(self, d_model: int, compressed_dim: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.pool = nn.Parameter(torch.zeros(d_model))  # attention-pooling scores x·pool (zero: mean at init)
        self.compress = nn.Linear(d_model, compressed_dim, bias=False)

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> PoolState:
        return PoolState(self, batch_size, device, dtype)

    def state_numbers(self, seq_len: int) -> int:
        return self.pool.numel() + 2

    def forward(self, x: Tensor, offset: int, state: PoolState | None = None) -> Tensor:
        """x[B,T,C], `offset` tokens of the first segment before this call -> [B, n_new, Cc]. The running
        sums of a partial first segment fold in (online softmax); with no state they are the empty sums."""
        B, T, C = x.shape
        W = self.window
        n = -(-(offset + T) // W)  # segments this call touches
        n_new = (offset + T) // W  # ... of which completed
        pad = (offset, n * W - offset - T)
        acc = torch.promote_types(x.dtype, torch.float32)  # at least fp32 (a float64 model stays float64)
        xf = x.to(acc)
        held = state if state is not None else self.new_state(B, x.device, acc)  # training: the empty sums
        max0, sum0, norm0 = held.max.to(acc), held.sum.to(acc), held.norm.to(acc)  # [B], [B, C], [B]
        score = F.pad(xf @ self.pool.to(acc), pad, value=float("-inf")).view(B, n, W)  # [B, n, W]
        xs = F.pad(xf, (0, 0, *pad)).view(B, n, W, C)  # [B, n, W, C]
        top = score.amax(dim=-1)  # [B, n], finite: every segment holds a token of this call
        top = torch.cat((torch.maximum(top[:, :1], max0[:, None]), top[:, 1:]), dim=1)
        weight = torch.exp(score - top[..., None])  # [B, n, W]
        carry = torch.exp(max0 - top[:, 0])  # [B]: rescales the held sums of the first segment (0 if empty)
        total = torch.einsum("bnw,bnwc->bnc", weight, xs)  # [B, n, C]
        total = torch.cat((total[:, :1] + (carry[:, None] * sum0)[:, None], total[:, 1:]), dim=1)
        norm = weight.sum(dim=-1)  # [B, n]
        norm = torch.cat((norm[:, :1] + (carry * norm0)[:, None], norm[:, 1:]), dim=1)
        if state is not None:  # what carries over: a partial last segment's sums, else the empty sums
            partial, dtype = n > n_new, state.sum.dtype
            state.max = top[:, -1].to(dtype, copy=True) if partial else torch.full_like(state.max, float("-inf"))
            state.sum = total[:, -1].to(dtype, copy=True) if partial else torch.zeros_like(state.sum)
            state.norm = norm[:, -1].to(dtype, copy=True) if partial else torch.zeros_like(state.norm)
        pooled = total[:, :n_new] / norm[:, :n_new, None]  # [B, n_new, C]
        return self.compress(pooled.to(x.dtype))


class MemoryState:
    """GMG: the FIFO of at most `mem_size` memory keys/values [B, H, n, D], oldest first."""

    def __init__(self, stage: GlobalMemory, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.k = torch.zeros(batch_size, stage.n_head, 0, stage.head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)


class GlobalMemory(nn.Module):
    """GMG: each token attends over the persistent slots and the memory of the (at most mem_size) segments
    completed before its own, O(T·(n_persistent + mem_size)); a sigmoid gate scales what it reads."""

    def __init__(self, d_model: int, n_head: int, compressed_dim: int, n_persistent: int, window: int,
                 mem_size: int) -> None:
        super().__init__()
        C = d_model
        self.n_head, self.head_dim, self.window, self.mem_size = n_head, C // n_head, window, mem_size
        self.qg = nn.Linear(C, 2 * C, bias=False)  # query and gate
        self.persistent = nn.Parameter(torch.randn(n_persistent, compressed_dim) * 0.02)  # learned memory slots
        self.kv = nn.Linear(compressed_dim, 2 * C, bias=False)  # a slot or summary -> memory key, value

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        return MemoryState(self, batch_size, device, dtype)

    def state_numbers(self, seq_len: int) -> int:
        return 2 * self.n_head * self.head_dim * min(seq_len // self.window, self.mem_size)

    def forward(self, x: Tensor, summaries: Tensor, offset: int, state: MemoryState | None = None) -> Tensor:
        """x[B,T,C], summaries[B,n_new,Cc] of the segments completed in this call -> [B, T, C].

        Every token of a segment sees the same keys, so the segment is the query position and its W tokens
        are query heads sharing each K/V head (grouped-query SDPA). Segments go in blocks of G = min(mem_size,
        n): block b sees the slots and one window of M + G - 1 entries (M = mem_size) under a [G, P + M + G - 1]
        band mask; every block is one batch entry of ONE fused SDPA call. No 5-D tensor, O(n·(P + M + G)) mask.
        """
        B, T, C = x.shape
        H, D, W, M = self.n_head, self.head_dim, self.window, self.mem_size
        q, gate = self.qg(x).split(C, dim=-1)
        k_new, v_new = self.kv(summaries).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4)  # [B, H, n_new, D]
        held = state if state is not None else self.new_state(B, x.device, x.dtype)  # training: an empty FIFO
        n_f = held.k.shape[2]  # entry e is the memory of segment s0 - n_f + e
        k_all = torch.cat((held.k.to(x.dtype), k_new), dim=2)  # [B, H, n_e, D]
        v_all = torch.cat((held.v.to(x.dtype), v_new), dim=2)
        if state is not None:
            keep = min(M, k_all.shape[2])
            state.k = k_all[:, :, k_all.shape[2] - keep:].detach().to(state.k.dtype, copy=True)
            state.v = v_all[:, :, v_all.shape[2] - keep:].detach().to(state.v.dtype, copy=True)
        n_e = k_all.shape[2]
        n = -(-(offset + T) // W)  # query segments s0 .. s0+n-1; segment j sees entries n_f+j-M .. n_f+j-1
        G = min(M, n)  # segments per block
        nb, E = -(-n // G), M + G - 1  # blocks; entries one block sees
        # padded entries: M zeros, then entry e at M + e; block b's window starts at padded index n_f + b·G
        right = max(0, n_f + (nb - 1) * G + E - M - n_e)
        slot_k, slot_v = self.kv(self.persistent.to(x.dtype)).view(-1, 2, H, D).permute(1, 2, 0, 3)  # [H, P, D]
        P = slot_k.shape[1]
        k_blocks, v_blocks = (
            torch.cat((slots[None, None].expand(B, nb, H, P, D),  # [B, nb, H, P + E, D]
                       F.pad(t, (0, 0, M, right))[:, :, n_f:].unfold(2, E, G)[:, :, :nb].permute(0, 2, 1, 4, 3)), dim=3)
            .reshape(B * nb, H, P + E, D) for slots, t in ((slot_k, k_all), (slot_v, v_all)))
        i = torch.arange(G, device=x.device)[:, None]  # segment within its block
        t = torch.arange(E, device=x.device)  # entry within the block's window
        at = n_f + G * torch.arange(nb, device=x.device)[:, None, None] + t  # [nb, 1, E]: padded index
        seen = (t >= i) & (t < i + M) & (at >= M) & (at < M + n_e)  # [nb, G, E]
        mask = torch.cat((seen.new_ones(nb, G, P), seen), dim=2)  # [nb, G, P + E]: the slots always
        mask = mask[None, :, None].expand(B, nb, 1, G, P + E).reshape(B * nb, 1, G, P + E)
        g = W if n > 1 else T  # tokens per segment (one partial segment: just the call's tokens)
        pad = (offset, nb * G * W - offset - T) if n > 1 else (0, 0)
        q = F.pad(q.view(B, T, H, D), (0, 0, 0, 0, *pad)).view(B, nb, G, g, H, D)
        q = q.permute(0, 1, 4, 3, 2, 5).reshape(B * nb, H * g, G, D)  # head h·g + token w reads K/V head h
        y = sdpa(q, k_blocks, v_blocks, attn_mask=mask, enable_gqa=g > 1)
        y = y.view(B, nb, H, g, G, D).permute(0, 1, 4, 3, 2, 5).reshape(B, -1, C)[:, pad[0]:pad[0] + T]
        return torch.sigmoid(gate) * y  # [B, T, C]


class RecurrentState:
    """CCU: the GRU state after the last completed segment [B, Cc]."""

    def __init__(self, stage: Recurrence, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.h = stage.h0.detach().to(device=device, dtype=dtype).expand(batch_size, -1).clone()


class Recurrence(nn.Module):
    """CCU: one GRU step per completed segment (over segments, never over tokens); the tokens of segment s
    read the state after segment s-1, projected to d_model. nn.GRU computes what nn.GRUCell stepped once
    per segment would (the same gates and weights; `RENAMED` maps GRUCell's parameter names to nn.GRU's)."""

    def __init__(self, d_model: int, compressed_dim: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.gru = nn.GRU(compressed_dim, compressed_dim, batch_first=True)
        self.h0 = nn.Parameter(torch.zeros(compressed_dim))  # learned initial state (read by segment 0)
        self.out = nn.Linear(compressed_dim, d_model, bias=False)

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> RecurrentState:
        return RecurrentState(self, batch_size, device, dtype)

    def state_numbers(self, seq_len: int) -> int:
        return self.h0.numel()

    def forward(self, summaries: Tensor, offset: int, T: int, state: RecurrentState | None = None) -> Tensor:
        """summaries[B,n_new,Cc] -> [B, T, C] for the call's T tokens, the first `offset` tokens into a segment.
        The recurrence is sequential over segments, so it is one nn.GRU call over all of them (one fused kernel,
        input projections of every segment in one matmul), not a Python loop of GRUCell steps."""
        B = summaries.shape[0]
        # a copy, not a view of the parameter: under no_grad a view still "requires grad" without a grad_fn,
        # which breaks autograd hooks such as the FLOP counter in Lightning's model summary
        h = state.h.to(summaries.dtype) if state is not None else self.h0.to(summaries.dtype).repeat(B, 1)
        states = h[:, None]  # [B, 1 + n_new, Cc]: states[:, j] is the state after segment s0 + j - 1
        if summaries.shape[1]:
            states = torch.cat((states, self.gru(summaries, h[None].contiguous())[0]), dim=1)
        if state is not None:
            state.h = states[:, -1].detach().to(state.h.dtype, copy=True)
        seg = (offset + torch.arange(T, device=summaries.device)) // self.window  # [T]: segment - s0
        return self.out(states)[:, seg]  # [B, T, C]


class EfficiaState:
    """One layer's decoding state: one slice per stage. Sizes are fixed from the start except the LCP ring
    (grows to `window` positions) and the FIFO (grows to `mem_size` entries): O(window + mem_size), not O(T)."""

    def __init__(self, mixer: EfficiaMixer, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.local, self.pool, self.memory, self.recurrent = (
            stage.new_state(batch_size, device, dtype) for stage in mixer.stages())


# The mixer's flat parameter names -> their names in its stage modules: state dicts saved under the flat names
# (checkpoints, exports) load as well (`KeepsPreviousNames`)
RENAMED = {"conv": "local.conv", "lcp_qkv.weight": "local.qkv.weight", "gmg_qg.weight": "memory.qg.weight",
           "persistent": "memory.persistent", "mem_kv.weight": "memory.kv.weight", "pool": "summary.pool",
           "compress.weight": "summary.compress.weight", "h0": "recurrence.h0",
           "ccu_out.weight": "recurrence.out.weight",
           **{f"gru.{p}": f"recurrence.gru.{p}_l0" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}}


def call(stage: nn.Module, *args) -> Tensor:
    return stage(*args)


def recomputed(stage: nn.Module, *args) -> Tensor:
    """stage(*args), its intermediate tensors dropped after the forward and recomputed in the backward."""
    return checkpoint(stage, *args, use_reentrant=False)


class EfficiaMixer(KeepsPreviousNames, Mixer):
    """The four stages over one call's tokens (a whole sequence, or a cached continuation); the fusion
    (FF) is this module's own: a per-position softmax over (lcp, gmg, ccu), then the output projection."""

    previous_names = RENAMED  # state dicts under the flat names load too

    def __init__(self, d_model: int, n_head: int, segment: int, mem_size: int, n_persistent: int,
                 compressed_dim: int, conv_size: int, dropout: float) -> None:
        super().__init__()
        check_heads(d_model, n_head)
        for key, value in (("segment", segment), ("mem_size", mem_size), ("n_persistent", n_persistent),
                           ("compressed_dim", compressed_dim), ("conv_size", conv_size)):
            require(value >= 1, f"model=efficia: {key} must be >= 1, got {value}; set model.{key}")
        C, Cc = d_model, compressed_dim
        self.d_model, self.window = C, segment  # window: the LCP band = segment
        self.local = LocalAttention(C, n_head, segment, conv_size)
        self.memory = GlobalMemory(C, n_head, Cc, n_persistent, segment, mem_size)
        self.summary = SegmentSummary(C, Cc, segment)
        self.recurrence = Recurrence(C, Cc, segment)
        self.fuse = nn.Linear(C, 3, bias=False)  # FF: per-position logits over (lcp, gmg, ccu)
        self.add_output(C, C, dropout)

    def stages(self) -> tuple[LocalAttention, SegmentSummary, GlobalMemory, Recurrence]:
        return self.local, self.summary, self.memory, self.recurrence

    def forward(self, x: Tensor, step: Step, state: EfficiaState | None = None) -> Tensor:
        local, pool, memory, recurrent = (None,) * 4 if state is None else (
            state.local, state.pool, state.memory, state.recurrent)
        offset = step.start % self.window  # tokens of the current segment before this call
        # training: the LCP and GMG keep only their inputs and output for backward and run again there
        # (their chunk scores, padded and regrouped copies are ~20 x [B, T, C] per layer; the rerun ~5% of a step)
        run = recomputed if state is None and torch.is_grad_enabled() else call
        lcp = run(self.local, x, step, local)
        summaries = self.summary(x, offset, pool)  # [B, n_new, Cc]: segments completed in this call
        gmg = run(self.memory, x, summaries, offset, memory)
        ccu = self.recurrence(summaries, offset, x.shape[1], recurrent)
        w = torch.softmax(self.fuse(x), dim=-1)  # [B, T, 3]
        return self.out(w[..., :1] * lcp + w[..., 1:2] * gmg + w[..., 2:] * ccu)

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> EfficiaState:
        return EfficiaState(self, batch_size, device, dtype)

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        return sum(stage.state_numbers(seq_len) for stage in self.stages()) * dtype.itemsize


@register("efficia")
class Efficia(DecoderLM):
    """Pre-norm blocks of (EfficiaMixer, SwiGLU), RMSNorm, tied embeddings, no position table: the
    context is unbounded (the state is constant in T), so decoding may run past max_seq_len."""

    bounded_context = False
    # the GRU's input and recurrent matrices are hidden maps like any other (3 gates stacked, as qkv stacks 3);
    # the depthwise conv filters, the memory slots (a learned table) and `fuse` (3 branch scores read out of
    # the stream, a tiny head) stay on AdamW
    muon_matrices = (*DecoderLM.muon_matrices, "blocks.*.mixer.local.qkv.weight", "blocks.*.mixer.memory.qg.weight",
                     "blocks.*.mixer.memory.kv.weight", "blocks.*.mixer.summary.compress.weight",
                     "blocks.*.mixer.recurrence.gru.weight_ih_l0", "blocks.*.mixer.recurrence.gru.weight_hh_l0",
                     "blocks.*.mixer.recurrence.out.weight", *GATED_FFN_MATRICES)
    adamw_matrices = (*DecoderLM.adamw_matrices, "blocks.*.mixer.local.conv", "blocks.*.mixer.memory.persistent",
                      "blocks.*.mixer.fuse.weight")

    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, max_seq_len: int,
                 dropout: float, segment: int, mem_size: int, n_persistent: int, compressed_dim: int,
                 conv_size: int, ffn_hidden: int, norm_eps: float,
                 tie_embeddings: bool, gradient_checkpointing: bool) -> None:
        self.segment = segment
        super().__init__(vocab_size, d_model, n_layer, max_seq_len, dropout, gradient_checkpointing,
                         tie_embeddings=tie_embeddings,
                         mixer=lambda _: EfficiaMixer(d_model, n_head, segment, mem_size, n_persistent, compressed_dim,
                                                      conv_size, dropout),
                         ffn=lambda: SwiGLU(d_model, ffn_hidden, dropout=dropout),
                         norm=lambda: RMSNorm(d_model, eps=norm_eps))
