"""`efficientlm`: EfficientLM, a pre-norm decoder with Multi-head Temporal Latent Attention (MTLA) and an
optional adapter that adds a frozen per-token external embedding to the token embeddings.

MTLA (Deng and Woodland, 2025) is MLA's low-rank KV latent `c = norm(x W_r)` plus one RoPE key shared by
the heads (the pieces in `latent.py`), then compressed in time: every `down_rate` = s consecutive latents
are merged into one slot with hypernetwork weights

    w_j = sigmoid(fc_c(c_j) · fc_p(pe_g)),   g = j // s (the chunk index, pe a sinusoidal code)

    positions   0  1 | 2  3 | 4  5 | 6        (s = 2)
    slots       [ 0 ] [ 1 ] [ 2 ] [3..        slot g = sum of w_j c_j over chunk g, so far

Training uses the stride-aware causal mask: query i sees the slots of the chunks that ended at or before i
plus its own partial chunk, the running weighted sum up to i. So the keys are the T running sums (in-chunk
cumulative sums, no loop over tokens) and key j is visible to query i iff j <= i and (j ends a chunk or
j == i). Every row sees at least its own column. Decoding keeps ceil(T/s) slots of (kv_rank + rope_dim)
numbers per layer: a token that starts a chunk appends a slot, any other token adds
into the last one (its RoPE key replaces the slot's, as the chunk-end column's key in training).

Deviations from the authors' code (docs/mtla.md): the latent norm is RMSNorm by default where they use LayerNorm
with a bias (`latent_norm: layernorm` trains theirs), and `ChunkMerge` names its two projections the other way
round from their HyperNetwork.

With down_rate 1 every chunk is one token: nothing is merged (no hypernetwork) and this is exactly
MLA-style latent attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efficia.models.construction import init_weights, mark_keep_float, require
from efficia.models.decoder import GATED_FFN_MATRICES, LATENT_ATTENTION_MATRICES, DecoderLM, Mixer, Step
from efficia.models.kernels import attend, attend_with_own_term
from efficia.models.latent import LatentHeads, LatentKV, LatentQuery, LatentState, recompute_in_backward
from efficia.models.layers import RMSNorm, SwiGLU
from efficia.models.registry import register


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal code [T, dim] of integer positions (sin on even, cos on odd features), in fp32."""
    div = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                    * (-math.log(10000.0) / dim))
    angles = positions.float()[:, None] * div  # [T, dim/2]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[:, :dim]  # [T, dim]


class ChunkMerge(nn.Module):
    """The hypernetwork of MTLA: a merge weight per latent from its content and its chunk's index, and the
    running weighted sums inside each chunk. Low rank kv_rank/4 as in the paper's code.

    Naming deviation (docs/mtla.md): here `fc_c` projects the latent Content and `fc_p` the chunk's Position
    code; the authors' HyperNetwork names them the other way round (their fc_c takes the chunk code C, their
    fc_p the latent P). The computation is the same; the names stay (renaming would load old checkpoints with
    the two roles silently swapped)."""

    def __init__(self, rank: int, down_rate: int) -> None:
        super().__init__()
        self.rank, self.down_rate = rank, down_rate
        hidden = max(1, rank // 4)
        self.fc_c = nn.Linear(rank, hidden)
        self.fc_p = nn.Linear(rank, hidden)

    def weights(self, c: Tensor, start: int) -> Tensor:
        """w[B,T,1] for latents c[B,T,r] at absolute positions start.. (chunk index = position // s)."""
        chunks = torch.arange(start, start + c.shape[1], device=c.device) // self.down_rate
        pe = sinusoid(chunks, self.rank).to(c.dtype)  # [T, r]
        return torch.sigmoid((self.fc_c(c) * self.fc_p(pe)).sum(-1, keepdim=True))  # [B, T, 1]

    def running_sums(self, u: Tensor, start: int, carry: Tensor | None = None) -> Tensor:
        """running[B,T,r]: for each position, the sum of u over its chunk up to and including it.

        `carry[B,r]`: the partial slot of the chunk in progress at `start` (when start % s != 0), which the
        positions of that chunk continue. Vectorised: pad to whole chunks, cumsum inside each chunk."""
        B, T, R = u.shape
        s, offset = self.down_rate, start % self.down_rate
        n_chunks = -(-(offset + T) // s)
        head = u.new_zeros(B, offset, R)
        if carry is not None and offset:
            head[:, 0] = carry.to(u.dtype)
        tail = u.new_zeros(B, n_chunks * s - offset - T, R)
        padded = torch.cat((head, u, tail), dim=1).view(B, n_chunks, s, R)  # [B, chunks, s, r]
        return padded.cumsum(dim=2).view(B, n_chunks * s, R)[:, offset:offset + T]  # [B, T, r]


def stride_aware_mask(start: int, length: int, n_prev: int, down_rate: int, device: torch.device) -> Tensor:
    """Boolean [length, n_prev + length], True where visible: every one of the n_prev completed slots before
    `start`, then the new running-sum columns where key j <= query i and (j ends a chunk or j == i).
    Never a fully masked row (the diagonal is always visible)."""
    q = torch.arange(start, start + length, device=device)[:, None]
    k = torch.arange(start, start + length, device=device)[None, :]
    new = (k <= q) & (((k + 1) % down_rate == 0) | (k == q))  # [T, T]
    return torch.cat((new.new_ones(length, n_prev), new), dim=1)


def stride_aware_attention(heads: LatentHeads, q_c: Tensor, q_r: Tensor, c: Tensor, k_r: Tensor, down_rate: int,
                           dropout: float = 0.0) -> Tensor:
    """The stride-aware mask's attention over the T running sums c[B,T,r] (with k_R[B,T,d_R]), queries at
    positions 0..T-1, without the [T, T] mask: what query i (chunk g = i // s) sees splits into

      completed chunks  slots 0..g-1 (the running sums at chunk ends): strictly causal over chunk index, the
                        same for the s queries of chunk g. So the s in-chunk offsets become query heads (each
                        a sequence of T/s queries) and one causal SDPA over T/s keys serves them all: keys
                        [sink, slot 0, .., slot n-2], query g sees the sink and slots < g.
      its own column    the running sum up to i, one key per query: its score is a dot product, folded into
                        the same softmax as the sink (`attend_with_own_term`).

    Per-head work is T·T/(2s) scores instead of the mask's T·T. -> [B, H, T, Dv]."""
    y = stride_aware_core(*stride_aware_inputs(heads, q_c, q_r, c, k_r, down_rate), dropout)  # [B, H·s, n, Dv+1]
    y = add_own_term(y, by_offset(heads.values(c), down_rate))
    return stride_aware_output(y, q_c.shape[2], down_rate)


def by_offset(t: Tensor, down_rate: int) -> Tensor:
    """[B, H, T, ·] or [B, H, T] -> [B, H·s, n, ·]: in-chunk offset r becomes a head (n = ceil(T/s) chunks, the
    queries of a partial last chunk padded to a whole one)."""
    T, s = t.shape[2], down_rate
    n = -(-T // s)
    t = F.pad(t, (0, 0, 0, n * s - T)) if t.dim() == 4 else F.pad(t, (0, n * s - T))
    return t.unflatten(2, (n, s)).transpose(2, 3).flatten(1, 2)


def stride_aware_inputs(heads: LatentHeads, q_c: Tensor, q_r: Tensor, c: Tensor, k_r: Tensor,
                        down_rate: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What `stride_aware_core` attends with, in-chunk offsets as heads (see `stride_aware_attention`):
    queries [B,H·s,n,D+d_R], slot keys [B,H,n-1,D+d_R] and values [B,H,n-1,Dv], and each query's score
    against its own running sum [B,H·s,n] (scaled). Cheap next to the attention: training recomputes them in
    backward (`recompute_in_backward`) instead of keeping their per-head [T, ·] intermediates."""
    T, s = q_c.shape[2], down_rate
    scale = 1.0 / math.sqrt(q_c.shape[-1] + q_r.shape[-1])
    q, k, v = heads.expanded_qkv(q_c, q_r, c, k_r)  # every running sum's key and value, per head
    own = (q * k).sum(-1) * scale  # [B, H, T]: each query against its own running sum
    n = -(-T // s)  # chunks
    slots_k, slots_v = k[:, :, s - 1::s][:, :, :n - 1], v[:, :, s - 1::s][:, :, :n - 1]  # [B, H, n-1, ·]
    return by_offset(q, s), slots_k, slots_v, by_offset(own, s)


def stride_aware_core(q: Tensor, slots_k: Tensor, slots_v: Tensor, own: Tensor, dropout: float = 0.0) -> Tensor:
    """One causal SDPA over [sink, slots] with the own score folded in -> [B, H·s, n, Dv + 1]: the slots'
    share of the output, then the weight p of the own running sum (`attend_with_own_term`, own_value None)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return attend_with_own_term(q, slots_k, slots_v, own, None, is_causal=True, scale=scale, dropout=dropout)


def add_own_term(y: Tensor, own_value: Tensor) -> Tensor:
    """[slots' output | p] [B,H·s,n,Dv+1] and own values [B,H·s,n,Dv] -> output + p·own value [B,H·s,n,Dv]."""
    return y[..., :-1] + y[..., -1:] * own_value


def stride_aware_output(y: Tensor, length: int, down_rate: int) -> Tensor:
    """[B, H·s, n, Dv] (in-chunk offsets as heads) -> [B, H, T, Dv] in position order, padding dropped."""
    return y.unflatten(1, (-1, down_rate)).transpose(2, 3).flatten(2, 3)[:, :, :length]


class SlotState:
    """MTLA decoding state of one layer: ceil(pos/s) slots, latent[B,n,r] and RoPE key[B,n,dr]. The last slot
    is partial while its chunk is in progress (pos % s != 0)."""

    def __init__(self, batch_size: int, rank: int, rope_dim: int, down_rate: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.down_rate = down_rate
        self.latent = torch.zeros(batch_size, 0, rank, device=device, dtype=dtype)
        self.rope_key = torch.zeros(batch_size, 0, rope_dim, device=device, dtype=dtype)

    def complete(self, pos: int) -> tuple[Tensor, Tensor]:
        """The slots of the chunks completed before position pos."""
        n = pos // self.down_rate
        return self.latent[:, :n], self.rope_key[:, :n]

    def carry(self, pos: int) -> Tensor | None:
        """The partial slot the token at pos continues (None at a chunk start)."""
        return self.latent[:, -1] if pos % self.down_rate else None

    def store(self, running: Tensor, rope_key: Tensor, pos: int) -> None:
        """Keep, of the columns for positions pos.., those that end a chunk and the last one: a chunk start
        appends a slot, any other position rewrites (adds into) the last."""
        T = running.shape[1]
        positions = torch.arange(pos, pos + T, device=running.device)
        keep = ((positions + 1) % self.down_rate == 0) | (positions == pos + T - 1)
        kept_latent, kept_key = self.complete(pos)
        self.latent = torch.cat((kept_latent, running[:, keep].to(self.latent.dtype)), dim=1)
        self.rope_key = torch.cat((kept_key, rope_key[:, keep].to(self.rope_key.dtype)), dim=1)


class Adapter(nn.Module):
    """Bottleneck adapter for external embeddings: up(silu(w1 x) · w2 x) + skip(x). `up` starts at zero, so
    training starts from the skip projection alone."""

    def __init__(self, d_ext: int, d_model: int, bottleneck: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_ext, bottleneck, bias=False)
        self.w2 = nn.Linear(d_ext, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, d_model, bias=False)
        self.skip = nn.Linear(d_ext, d_model, bias=False)
        mark_keep_float(self.skip)  # its weight's dtype sets the external table's (efficia.inference.quantize)

    def zero_up(self) -> None:
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.silu(self.w1(x)) * self.w2(x)) + self.skip(x)


class TemporalLatentAttention(Mixer):
    """MTLA as a mixer: latent query/KV/heads from `latent.py`, the chunk merge and stride-aware mask from
    here. Training attends with per-head K/V expanded (SDPA); decoding with the weights absorbed, straight
    over the slots."""

    def __init__(self, d_model: int, n_head: int, kv_rank: int, qk_nope_head_dim: int, rope_dim: int,
                 v_head_dim: int, down_rate: int, rope_theta: float, dropout: float, norm_eps: float,
                 latent_norm: str = "rmsnorm") -> None:
        super().__init__()
        self.rank, self.rope_dim, self.down_rate = kv_rank, rope_dim, down_rate
        self.rope_theta, self.dropout = rope_theta, dropout
        self.query = LatentQuery(d_model, n_head, qk_nope_head_dim, rope_dim, None, norm_eps=norm_eps)
        self.kv = LatentKV(d_model, kv_rank, rope_dim, norm_eps=norm_eps, norm=latent_norm)
        self.heads = LatentHeads(n_head, kv_rank, qk_nope_head_dim, v_head_dim)
        self.merge = ChunkMerge(kv_rank, down_rate) if down_rate > 1 else None  # s=1: nothing to merge
        self.add_output(n_head * v_head_dim, d_model, dropout)

    def forward(self, x: Tensor, step: Step, state: SlotState | None = None) -> Tensor:
        B, T, _ = x.shape
        start = step.start
        rope = step.rope(self.rope_dim, self.rope_theta)
        dropout = self.dropout if self.training else 0.0
        if state is None:  # training: the projections are recomputed in backward, only attention's inputs kept
            require(start % self.down_rate == 0, "efficientlm: a forward without a cache starts at a chunk "
                    f"boundary, got start {start}; pass a state to continue a chunk")
            inputs = recompute_in_backward(self.training_inputs, x, rope, start)
            if self.merge is None:  # s=1: plain MLA-style causal attention
                y = attend(*inputs, dropout, scale=1.0 / math.sqrt(inputs[0].shape[-1]))  # [B, H, T, Dv]
                return recompute_in_backward(self.out, y)  # [B, T, C]
            y = stride_aware_core(*inputs, dropout)  # [B, H·s, n, Dv + 1]: kept by SDPA for its backward anyway
            return recompute_in_backward(self.finish, y, x, rope, start)  # [B, T, C]
        q_c, q_r, c, k_r = self.latents(x, rope, start, state.carry(start))
        prev_c, prev_r = state.complete(start)  # slots of the chunks finished before this call
        state.store(c, k_r, start)
        mask = stride_aware_mask(start, T, prev_c.shape[1], self.down_rate, x.device) if T > 1 else None
        c = torch.cat((prev_c.to(c.dtype), c), dim=1)  # [B, n_prev + T, r]
        k_r = torch.cat((prev_r.to(k_r.dtype), k_r), dim=1)  # [B, n_prev + T, d_R]
        y = self.heads.attend(q_c, q_r, c, k_r, absorbed=True, mask=mask, dropout=dropout)
        return self.out(y)  # [B, H, T, Dv] -> [B, T, C]

    def latents(self, x: Tensor, rope: tuple[Tensor, Tensor], start: int,
                carry: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q_c [B,H,T,D], q_R [B,H,T,d_R], the running sums c [B,T,r] (continuing `carry`) and k_R [B,T,d_R]."""
        return *self.query(x, rope), *self.running(x, rope, start, carry)

    def running(self, x: Tensor, rope: tuple[Tensor, Tensor], start: int,
                carry: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The running sums c [B,T,r] (the latents themselves at s=1) and k_R [B,T,d_R]."""
        c, k_r = self.kv(x, rope)
        if self.merge is not None:
            c = self.merge.running_sums(c * self.merge.weights(c, start), start, carry)
        return c, k_r

    def finish(self, y: Tensor, x: Tensor, rope: tuple[Tensor, Tensor], start: int) -> Tensor:
        """`stride_aware_core`'s [slots' output | p] -> the residual branch [B,T,C]: p·own value added (the own
        values from x again), positions back in order, output projection. Training recomputes it in backward
        from y (kept by SDPA) and x (kept by `training_inputs`'s recomputation): nothing of its own is kept."""
        c, _ = self.running(x, rope, start)
        y = add_own_term(y, by_offset(self.heads.values(c), self.down_rate))  # [B, H·s, n, Dv]
        return self.out(stride_aware_output(y, x.shape[1], self.down_rate))  # [B, H, T, Dv] -> [B, T, C]

    def training_inputs(self, x: Tensor, rope: tuple[Tensor, Tensor], start: int) -> tuple[Tensor, ...]:
        """x -> what training attends with: q, k, v (s=1) or `stride_aware_inputs`."""
        q_c, q_r, c, k_r = self.latents(x, rope, start)
        if self.merge is None:
            return self.heads.expanded_qkv(q_c, q_r, c, k_r)
        return stride_aware_inputs(self.heads, q_c, q_r, c, k_r, self.down_rate)

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> SlotState:
        return SlotState(batch_size, self.rank, self.rope_dim, self.down_rate, device, dtype)

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        return LatentState.nbytes(-(-seq_len // self.down_rate), self.rank, self.rope_dim, dtype)


@register("efficientlm")
class EfficientLM(DecoderLM):
    """Pre-norm MTLA blocks with SwiGLU (`ffn_hidden`, 8/3·d in the yaml), RMSNorm, learned absolute positions
    (in training and decoding alike), tied head, and the optional external-embedding adapter (`external.source`).

    `external_table` [vocab, d_ext]: the frozen table itself, a tensor the caller gives (the model reads no files:
    `efficia.build.build_model` reads it from `external.source`, or takes its shape from the weights being
    loaded, so a checkpoint or export that holds the table never needs the source file again)."""

    inputs = ("external_table",)  # constructor tensors that are not config keys (efficia.build reads them)
    learned_positions = True
    # the adapter's four maps read dense external features (not one-hot rows): hidden matrices. The chunk merge's
    # fc_c and fc_p only score one sigmoid weight per latent (a read-out, like the head): AdamW
    muon_matrices = (*DecoderLM.muon_matrices, *LATENT_ATTENTION_MATRICES, *GATED_FFN_MATRICES,
                     "adapter.w1.weight", "adapter.w2.weight", "adapter.up.weight", "adapter.skip.weight")
    adamw_matrices = (*DecoderLM.adamw_matrices, "blocks.*.mixer.merge.fc_c.weight", "blocks.*.mixer.merge.fc_p.weight")

    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, max_seq_len: int,
                 dropout: float, kv_rank: int, qk_nope_head_dim: int, rope_dim: int, v_head_dim: int,
                 down_rate: int, ffn_hidden: int, rope_theta: float, norm_eps: float, latent_norm: str,
                 external: dict[str, Any],
                 tie_embeddings: bool, gradient_checkpointing: bool, external_table: Tensor | None = None) -> None:
        require(down_rate >= 1, f"efficientlm: down_rate must be >= 1, got {down_rate}; set model.down_rate")
        require(rope_dim >= 2 and rope_dim % 2 == 0,
                f"efficientlm: rope_dim must be even and >= 2 (the decoupled RoPE key), got {rope_dim}")
        require(min(kv_rank, qk_nope_head_dim, v_head_dim, n_head) >= 1,
                "efficientlm: kv_rank, qk_nope_head_dim, v_head_dim and n_head must be >= 1")
        require((external["source"] is None) == (external_table is None),
                "efficientlm: model.external.source and the external_table given must agree (build the model with "
                "efficia.build.build_model, which reads the table)")
        require(external_table is None or (external_table.dim() == 2 and external_table.shape[0] == vocab_size),
                f"efficientlm: the external table must be [vocab_size={vocab_size}, d], got "
                f"{None if external_table is None else tuple(external_table.shape)}")
        self.down_rate = down_rate
        table = None if external_table is None else external_table.detach().float()

        super().__init__(vocab_size, d_model, n_layer, max_seq_len, dropout, gradient_checkpointing,
                         tie_embeddings=tie_embeddings,
                         mixer=lambda _: TemporalLatentAttention(d_model, n_head, kv_rank, qk_nope_head_dim, rope_dim,
                                                                 v_head_dim, down_rate, rope_theta, dropout, norm_eps,
                                                                 latent_norm),
                         ffn=lambda: SwiGLU(d_model, ffn_hidden, dropout=dropout),
                         norm=lambda: RMSNorm(d_model, eps=norm_eps))
        self.adapter = None
        if table is not None:
            # frozen and saved with the weights: generation uses the very table training used
            self.register_buffer("external_table", table)
            self.adapter = Adapter(table.shape[1], d_model, external["bottleneck"])
            init_weights(self.adapter, n_layer)
            self.adapter.zero_up()

    def embed(self, idx: Tensor, step: Step) -> Tensor:
        """Token + position embeddings, plus the adapted external embedding of each token (per position, so
        causal by construction)."""
        x = super().embed(idx, step)
        if self.adapter is not None:
            external = F.embedding(idx, self.external_table)  # [B, T, d_ext]
            x = x + self.adapter(external.to(self.adapter.skip.weight.dtype))
        return x
