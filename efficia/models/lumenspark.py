"""`lumenspark`: a block-causal Linformer LM (the seed's Linformer, made causal).

Linformer compresses keys and values along the sequence (K' = E K). Over the whole sequence every
compressed key mixes future tokens, and masking the scores cannot undo that. Here the sequence is cut
into blocks of `block` tokens and only a *completed* block is compressed, to `k_per_block` slots by E
(keys) and F (values), learned and shared by every block:

    tokens   | b0 ........ | b1 ........ | b2 ...q      (block = 8, k_per_block = 2)
    query q sees   [E·K(b0)]     [E·K(b1)]    exact K of b2 up to q (causal)
                   2 slots       2 slots      <= 8 tokens

So a query attends over `block + (its block index)·k_per_block` keys: O(T·(block + T/block·k_per_block))
time, no T×T mask and no mask over slots in training: one fused causal SDPA over [sinks, all slots]
serves every block at once (`block_causal_attention`), with each query's own block folded into the same
softmax. Decoding keeps the current block's exact K/V and the compressed slots of the completed blocks
(`BlockLinformerState`).

Around the mixer, as the seed: low-rank query projection (`LowRankLinear`, W ≈ U·V), a factorised
GELU feed-forward (its hidden activation recomputed from the rank-wide one in backward), RMSNorm,
learned token + position embeddings, untied head. Unlike the seed the blocks are pre-norm (the shared
`PreNormBlock`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efficia.models.construction import check_heads, mark_keep_init, mark_residual, require
from efficia.models.decoder import DecoderLM, Mixer, Step
from efficia.models.kernels import attend_sink, attend_sink_masked, sdpa, softmax_with_lse, with_sinks
from efficia.models.layers import Dropout, RMSNorm, autocasting
from efficia.models.registry import register


class LowRankLinear(nn.Module):
    """x -> up(down(x)): a rank-`rank` factorisation of an in×out matrix ((in + out)·rank parameters).

    `down` starts at N(0, 1/rank) and keeps it (`mark_keep_init`), `up` gets the model's init, so the
    product starts with the same per-entry std as a plain linear layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 residual: bool = False) -> None:
        super().__init__()
        require(rank >= 1, f"LowRankLinear: rank must be >= 1, got {rank}")
        self.down = mark_keep_init(nn.Linear(in_features, rank, bias=False))
        self.up = mark_residual(nn.Linear(rank, out_features, bias=bias), residual)
        nn.init.normal_(self.down.weight, std=1 / math.sqrt(rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class LowRankFeedForward(nn.Module):
    """The seed's factorised feed-forward: low-rank down(gelu(low-rank up(x))).

    In training its `hidden`-wide middle, gelu(U_fc · z) with z the rank-wide fc.down(x), is neither kept
    for backward nor materialised for all tokens at once (`factorised_gelu`): it is recomputed from z in
    chunks of tokens. At scale=small that is 1,024 floats per token kept twice, the widest activation of
    the model, against 64 for z."""

    def __init__(self, dim: int, hidden: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = LowRankLinear(dim, hidden, rank)
        self.proj = LowRankLinear(hidden, dim, rank, residual=True)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        up, down = self.fc.up, self.proj.down
        lean = (torch.is_grad_enabled() and not autocasting(x)
                and all(type(m) is nn.Linear and m.bias is None for m in (up, down)))
        if not lean:  # inference, autocast, quantized layers, biases: the plain composition
            return self.dropout(self.proj(F.gelu(self.fc(x))))
        return self.dropout(self.proj.up(factorised_gelu(self.fc.down(x), up.weight, down.weight)))


class _FactorisedGelu(torch.autograd.Function):
    """gelu(z @ up^T) @ down^T chunk by chunk of tokens, keeping z, up and down for backward."""

    @staticmethod
    def forward(ctx, z: Tensor, up: Tensor, down: Tensor, chunk: int) -> Tensor:
        ctx.chunk = chunk
        ctx.save_for_backward(z, up, down)
        flat = z.reshape(-1, z.shape[-1])
        out = flat.new_empty(flat.shape[0], down.shape[0])
        for start in range(0, flat.shape[0], chunk):
            torch.mm(F.gelu(flat[start:start + chunk] @ up.T), down.T, out=out[start:start + chunk])
        return out.view(*z.shape[:-1], down.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        z, up, down = ctx.saved_tensors
        flat, grad = z.reshape(-1, z.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_z, grad_up, grad_down = torch.empty_like(flat), torch.zeros_like(up), torch.zeros_like(down)
        for start in range(0, flat.shape[0], ctx.chunk):
            z_c, g_c = flat[start:start + ctx.chunk], grad[start:start + ctx.chunk]
            h = z_c @ up.T  # [chunk, hidden], recomputed
            grad_down.addmm_(g_c.T, F.gelu(h))
            grad_h = torch.ops.aten.gelu_backward(g_c @ down, h)
            grad_up.addmm_(grad_h.T, z_c)
            torch.mm(grad_h, up, out=grad_z[start:start + ctx.chunk])
        return grad_z.view_as(z), grad_up, grad_down, None


def factorised_gelu(z: Tensor, up: Tensor, down: Tensor, chunk: int = 1024) -> Tensor:
    """gelu(z @ up^T) @ down^T for z[.., r] and up [hidden, r], down [r', hidden]: the middle of a factorised
    feed-forward, where `hidden` >> r. Backward keeps z (r floats per token) instead of the hidden activation
    and its gelu (2·hidden), and recomputes them; both passes go `chunk` tokens at a time, so no hidden-wide
    tensor of the whole sequence exists even briefly (the forward and backward peaks of a long sequence).
    Costs one more z @ up^T in backward."""
    return _FactorisedGelu.apply(z, up, down, chunk)


def pooling_projection(k_per_block: int, block: int) -> Tensor:
    """[k_per_block, block]: slot i averages the i-th of k_per_block equal spans of the block (the
    starting point of E and F, so a slot begins as a summary of a span rather than random noise)."""
    span = torch.arange(block) * k_per_block // block  # the slot each token starts in
    weights = (span[None, :] == torch.arange(k_per_block)[:, None]).float()
    return weights / weights.sum(-1, keepdim=True)


def compress(x: Tensor, proj: Tensor, block: int) -> Tensor:
    """Completed blocks of x[B,Hkv,n·block,D] -> their slots [B,Hkv,n·k_per_block,D] (Linformer's E·K)."""
    B, Hkv, T, D = x.shape
    blocks = x.reshape(B, Hkv, T // block, block, D)  # [B, Hkv, n, block, D]
    slots = torch.einsum("sj,bhnjd->bhnsd", proj.to(x.dtype), blocks)  # [B, Hkv, n, S, D]
    return slots.reshape(B, Hkv, -1, D)  # [B, Hkv, n·S, D]


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, e: Tensor, f: Tensor, block: int,
                           past_k: Tensor | None = None, past_v: Tensor | None = None,
                           dropout: float = 0.0) -> Tensor:
    """Block-causal Linformer attention for q[B,H,Tq,D] against k,v[B,Hkv,Tk,D], Tq <= Tk.

    k, v start at a block boundary and the queries are their last Tq positions (bottom-right
    aligned, as in a cached call). A query in block c sees: every `past` slot ([B,Hkv,P,D], from
    blocks before k's first one), the slots of blocks 0..c-1 of k, and the exact keys of block c
    up to itself. No loop over blocks; two exact parts merged in one softmax:

    - local (explicit, batched over blocks, O(T·(S + block))): the query's own block causally, plus
      the slots of the block before it from index j = (offset in block) % S on;
    - prefix (ONE fused causal SDPA): the slots before those. With the query's phase j as its row
      within its block (rows c·S + j, the offsets t = u·S + j becoming heads u) and keys
      [S+1 sinks, past, slot 0, slot 1, ..], row c·S + j sees exactly the sinks and the slots before
      the local part's: causal from the top-left corner, no mask and no copies of the slots (a cached
      call with past slots shifts the rows by P: there, a [rows, keys] boolean mask).

    The local part enters the prefix call as its sink term (`attend_sink`): the first S rows see fewer
    than S+1 sinks, so every query's own score is its local log-sum-exp minus log(sinks it sees).
    Dropout (training) drops slot weights per key and the local part's weight per sink share.
    """
    B, H, q_len, D = q.shape
    Hkv, k_len, S = k.shape[1], k.shape[2], e.shape[0]
    n, G, U = -(-k_len // block), H // Hkv, -(-block // S)
    front, pad = k_len - q_len, n * block - k_len
    if front or pad:  # dummy queries before (< one block) and after (padding)
        q = F.pad(q, (0, 0, front, pad))
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    scale = 1.0 / math.sqrt(D)
    # slots of blocks 0..n-2 (the last block is nobody's earlier block here), after the past ones
    slots_k, slots_v = compress(k[:, :, :(n - 1) * block], e, block), compress(v[:, :, :(n - 1) * block], f, block)
    if past_k is not None:
        slots_k = torch.cat((past_k.to(k.dtype), slots_k), dim=2)  # [B, Hkv, P + (n-1)·S, D]
        slots_v = torch.cat((past_v.to(v.dtype), slots_v), dim=2)
    n_past = slots_k.shape[2] - (n - 1) * S

    def local(own: Tensor, slots: Tensor) -> Tensor:  # [B, Hkv, n, S + block, D]
        before = F.pad(slots, (0, 0, S, 0))[:, :, n_past:]  # block c: slots P+(c-1)·S .. P+c·S-1 (zeros before 0)
        return torch.cat((before.view(B, Hkv, n, S, D), own.view(B, Hkv, n, block, D)), dim=3)

    # a K/V head's G query heads side by side per block ([B, Hkv, n, G·block, D]), so that the local keys and
    # values are not copied G times by a broadcasting matmul
    q_local = q.view(B, Hkv, G, n, block, D).transpose(2, 3).reshape(B, Hkv, n, G * block, D)
    visible, sinks = local_visibility(n, block, S, n_past, q.device)
    scores = q_local @ local(k, slots_k).transpose(-1, -2) * scale  # [B, Hkv, n, G·block, S + block]
    probs, lse = softmax_with_lse(scores.masked_fill(~visible.repeat(1, G, 1), float("-inf")))
    own_out = (probs @ local(v, slots_v)).view(B, Hkv, n, G, block, D).transpose(2, 3)  # [B, Hkv, G, n, block, D]
    own_score = lse.view(B, Hkv, n, G, block).transpose(2, 3) - sinks.to(lse.dtype).log()  # a share per sink

    def rows(t: Tensor) -> Tensor:  # [B, ·, n, block, ·] -> [B, H·U, n·S, ·]: offset u·S + j -> head u, row c·S + j
        t = t.reshape(B, H, n, block, t.shape[-1])
        t = (F.pad(t, (0, 0, 0, U * S - block)) if U * S > block else t).view(B, H, n, U, S, t.shape[-1])
        return t.transpose(2, 3).reshape(B, H * U, n * S, t.shape[-1])

    keys, values = with_sinks(slots_k, slots_v, S + 1)  # [B, Hkv, S + 1 + P + (n-1)·S, D + 1]
    args = (rows(q), keys, values, rows(own_score.unsqueeze(-1))[..., 0], rows(own_out))
    if n_past:  # row r sees keys 0 .. P + r
        mask = torch.arange(keys.shape[2], device=q.device) <= n_past + torch.arange(n * S, device=q.device)[:, None]
        y = attend_sink_masked(*args, attn_mask=mask, scale=scale, dropout=dropout)
    else:  # row r sees keys 0 .. r
        y = attend_sink(*args, is_causal=True, scale=scale, dropout=dropout)  # [B, H·U, n·S, D]
    y = y.view(B, H, U, n, S, D).transpose(2, 3).reshape(B, H, n, U * S, D)[:, :, :, :block]
    return y.reshape(B, H, n * block, D)[:, :, front:front + q_len]


def local_visibility(n: int, block: int, S: int, n_past: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """What `block_causal_attention`'s explicit part sees, [n, block, S + block] (True = visible): slot i of the
    block before iff i >= offset % S and that slot exists (index P + (c-1)·S + i >= 0), and the own block
    causally; and how many sinks each query's prefix row sees, [n, block] (float)."""
    c = torch.arange(n, device=device)[:, None, None]
    t = torch.arange(block, device=device)[None, :, None]
    i = torch.arange(S, device=device)[None, None, :]
    before = (i >= t % S) & (n_past + (c - 1) * S + i >= 0)  # [n, block, S]
    own = torch.arange(block, device=device)[None, None, :] <= t  # [1, block, block]
    visible = torch.cat((before, own.expand(n, block, block)), dim=-1)
    row = (c * S + t % S)[..., 0]  # [n, block]: the query's prefix row
    return visible, (n_past + row + 1).clamp(max=S + 1).to(torch.float32)


class BlockLinformerState:
    """Decoding state: exact K/V of the current, incomplete block ([B, Hkv, < block, D]) and the
    compressed slots of every completed block ([B, Hkv, completed·k_per_block, D])."""

    def __init__(self, batch_size: int, n_kv_head: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.k = torch.zeros(batch_size, n_kv_head, 0, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.slots_k = torch.zeros_like(self.k)
        self.slots_v = torch.zeros_like(self.k)


class BlockLinformerAttention(Mixer):
    """Low-rank query projection, K/V projection (`n_kv_head` heads shared by groups of query heads),
    block-causal Linformer attention with learned E, F [k_per_block, block], output projection."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None, block: int, k_per_block: int,
                 q_rank: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        n_kv_head = check_heads(d_model, n_head, n_kv_head)
        require(block >= 1 and 1 <= k_per_block <= block,
                f"lumenspark: need block >= 1 and 1 <= k_per_block <= block, got block={block}, "
                f"k_per_block={k_per_block}; set model.block / model.k_per_block")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.block, self.k_per_block, self.dropout = block, k_per_block, dropout
        self.q = LowRankLinear(d_model, d_model, q_rank, bias=bias)
        self.kv = nn.Linear(d_model, 2 * n_kv_head * self.head_dim, bias=bias)
        self.e = nn.Parameter(pooling_projection(k_per_block, block))  # keys:   block -> k_per_block
        self.f = nn.Parameter(pooling_projection(k_per_block, block))  # values: block -> k_per_block
        self.add_output(d_model, d_model, dropout, bias)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, T, D] through the low-rank projection; k, v [B, Hkv, T, D]."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k, v = self.kv(x).view(B, T, 2, Hkv, D).permute(2, 0, 3, 1, 4)  # 2 x [B, Hkv, T, D]
        return q, k, v

    def forward(self, x: Tensor, step: Step, state: BlockLinformerState | None = None) -> Tensor:
        q, k, v = self.qkv(x)
        dropout = self.dropout if self.training else 0.0
        if state is None:
            return self.out(block_causal_attention(q, k, v, self.e, self.f, self.block, dropout=dropout))
        return self.out(self._decode(q, k, v, state, dropout))

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, state: BlockLinformerState, dropout: float) -> Tensor:
        """Attend from the cache, then compress every block this call completed into the slots."""
        k = torch.cat((state.k.to(k.dtype), k), dim=2)  # [B, Hkv, t + T, D]: from the current block's start
        v = torch.cat((state.v.to(v.dtype), v), dim=2)
        if k.shape[2] <= self.block and q.shape[2] == 1:  # one token: every cached key is visible, no mask
            keys = torch.cat((state.slots_k.to(k.dtype), k), dim=2)
            values = torch.cat((state.slots_v.to(v.dtype), v), dim=2)
            y = sdpa(q, keys, values, dropout_p=dropout, enable_gqa=k.shape[1] != q.shape[1])
        else:
            y = block_causal_attention(q, k, v, self.e, self.f, self.block, state.slots_k, state.slots_v, dropout)
        done = k.shape[2] // self.block * self.block
        if done:
            dtype = state.slots_k.dtype
            state.slots_k = torch.cat((state.slots_k, compress(k[:, :, :done], self.e, self.block).to(dtype)), 2)
            state.slots_v = torch.cat((state.slots_v, compress(v[:, :, :done], self.f, self.block).to(dtype)), 2)
        state.k = k[:, :, done:].to(state.k.dtype).clone()  # a copy: do not keep the whole chunk alive
        state.v = v[:, :, done:].to(state.v.dtype).clone()
        return y

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> BlockLinformerState:
        return BlockLinformerState(batch_size, self.n_kv_head, self.head_dim, device, dtype)

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        positions = seq_len // self.block * self.k_per_block + seq_len % self.block
        return 2 * self.n_kv_head * self.head_dim * positions * dtype.itemsize


@register("lumenspark")
class Lumenspark(DecoderLM):
    """`q_rank` is the query projection's rank; the feed-forward is d -> ffn_hidden -> d through two
    LowRankLinear of rank `ffn_rank`. `n_kv_head` 1 is the seed's single shared K/V head. `attention_bias`:
    biases on the attention projections (query, key/value, output), nowhere else (the feed-forward and the
    RMSNorms have none)."""

    learned_positions = True
    # each low-rank factor is a hidden map of its own; E and F mix positions of a block (not features) and
    # start as span averages: AdamW, like the position table
    muon_matrices = (*DecoderLM.muon_matrices, "blocks.*.mixer.q.down.weight", "blocks.*.mixer.q.up.weight",
                     "blocks.*.mixer.kv.weight", "blocks.*.ffn.fc.down.weight", "blocks.*.ffn.fc.up.weight",
                     "blocks.*.ffn.proj.down.weight", "blocks.*.ffn.proj.up.weight")
    adamw_matrices = (*DecoderLM.adamw_matrices, "blocks.*.mixer.e", "blocks.*.mixer.f")

    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, n_kv_head: int | None,
                 max_seq_len: int, dropout: float, block: int, k_per_block: int, q_rank: int, ffn_hidden: int,
                 ffn_rank: int, norm_eps: float, attention_bias: bool,
                 tie_embeddings: bool, gradient_checkpointing: bool) -> None:
        self.block, self.k_per_block = block, k_per_block
        super().__init__(vocab_size, d_model, n_layer, max_seq_len, dropout, gradient_checkpointing,
                         tie_embeddings=tie_embeddings,
                         mixer=lambda _: BlockLinformerAttention(d_model, n_head, n_kv_head, block, k_per_block, q_rank,
                                                                 dropout, attention_bias),
                         ffn=lambda: LowRankFeedForward(d_model, ffn_hidden, ffn_rank, dropout),
                         norm=lambda: RMSNorm(d_model, eps=norm_eps))
