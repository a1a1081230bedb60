"""`efficia`: EFFICIA-1, a segment-recurrent block, causal by construction and linear in T.

The sequence is cut into segments of `segment` tokens (segment s = positions s·W .. s·W+W-1, W = segment);
the LCP's sliding window is the segment length too.
One mixer per block holds the four stages; the block adds a SwiGLU after it:

    x ─┬─ causal depthwise conv ─ q,k,v ─ LCP: sliding-window linear attention (elu+1) ── lcp ─┐
       ├─ q ─ GMG: softmax over [n_persistent slots | summaries of segments s-mem_size..s-1]   │
       │       · sigmoid gate ─────────────────────────────────────────────────────────── gmg ─┼─ FF: per-position
       └─ CCU: GRU state after segment s-1 (one GRUCell step per completed segment) ── ccu ────┘  softmax gate -> proj
    completed segment ── learned attention pooling ── summary ─┬─ compress ─ memory key/value (FIFO)
                                                               └─ compress ─ GRUCell input

The seed leaked twice: its window linear attention was not causal inside a window and its CCU pooled
the whole sequence and broadcast it. Here a token at position i sees keys i-W+1..i in the LCP, and
only summaries of segments that ended before its own segment began in the GMG and the CCU.

Decoding state per layer (`EfficiaState`), constant in T once full: the conv's last inputs, the
LCP's features of the last `window` positions, the running pooling sums of the partial segment,
the FIFO of at most `mem_size` memory keys/values, and the GRU state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efficia.models.attention import RingKVState
from efficia.models.blocks import RMSNorm, SwiGLU, check_heads, require
from efficia.models.decoder import DecoderLM, Mixer, Step
from efficia.models.registry import register

EPS = 1e-6  # linear-attention normaliser floor


def feature_map(x: Tensor) -> Tensor:
    """elu+1: a positive feature map, so the normaliser phi(q)·sum phi(k) is never zero."""
    return F.elu(x) + 1


def window_linear_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
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


class EfficiaState:
    """One layer's decoding state. Sizes are fixed from the start except the LCP ring (grows to
    `window` positions) and the FIFO (grows to `mem_size` entries): O(window + mem_size), not O(T)."""

    def __init__(self, mixer: EfficiaMixer, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
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


class EfficiaMixer(Mixer):
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

    def forward(self, x: Tensor, step: Step, state: EfficiaState | None = None) -> Tensor:
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

    def recurrent(self, summaries: Tensor, offset: int, T: int, state: EfficiaState | None) -> Tensor:
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

    def local(self, x: Tensor, step: Step, state: EfficiaState | None) -> Tensor:
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
        y = window_linear_attention(q, k, v, self.window)  # [B, H, T, D]
        return y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]

    def summarise(self, x: Tensor, offset: int, state: EfficiaState | None) -> Tensor:
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

    def memory(self, x: Tensor, summaries: Tensor, offset: int, state: EfficiaState | None) -> Tensor:
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

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> EfficiaState:
        return EfficiaState(self, batch_size, device, dtype)

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        C = self.d_model
        numbers = ((self.conv_size - 1) * C + 2 * C * min(seq_len, self.window) + (C + 2)
                   + 2 * C * min(seq_len // self.window, self.mem_size) + self.h0.numel())
        return numbers * dtype.itemsize


@register("efficia")
class Efficia(DecoderLM):
    """Pre-norm blocks of (EfficiaMixer, SwiGLU), RMSNorm, tied embeddings, no position table: the
    context is unbounded (the state is constant in T), so decoding may run past max_seq_len."""

    bounded_context = False

    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, max_seq_len: int,
                 dropout: float, segment: int, mem_size: int, n_persistent: int, compressed_dim: int,
                 conv_size: int, ffn_hidden: int, norm_eps: float, gradient_checkpointing: bool) -> None:
        self.segment = segment
        super().__init__(vocab_size, d_model, n_layer, max_seq_len, dropout, gradient_checkpointing,
                         mixer=lambda _: EfficiaMixer(d_model, n_head, segment, mem_size, n_persistent, compressed_dim,
                                                      conv_size, dropout),
                         ffn=lambda: SwiGLU(d_model, ffn_hidden, dropout=dropout),
                         norm=lambda: RMSNorm(d_model, eps=norm_eps))

    def structure(self) -> dict[str, int]:
        return {"segment": self.segment}
