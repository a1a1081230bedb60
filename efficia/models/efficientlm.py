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
j == i). Every row sees at least its own column. Decoding keeps ceil(T/s) slots of (kv_lora_rank +
qk_rope_head_dim) numbers per layer: a token that starts a chunk appends a slot, any other token adds
into the last one (its RoPE key replaces the slot's, as the chunk-end column's key in training).

With down_rate 1 every chunk is one token: nothing is merged (no hypernetwork) and this is exactly
MLA-style latent attention.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efficia.errors import ConfigError
from efficia.models.blocks import (
    Dropout,
    PreNormBlock,
    RMSNorm,
    SwiGLU,
    attend_with_own_term,
    init_weights,
    require,
)
from efficia.models.decoder import DecoderLM, Mixer, Step
from efficia.models.latent import LatentHeads, LatentKV, LatentQuery, LatentState
from efficia.models.registry import register


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal code [T, dim] of integer positions (sin on even, cos on odd features), in fp32."""
    div = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                    * (-math.log(10000.0) / dim))
    angles = positions.float()[:, None] * div  # [T, dim/2]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[:, :dim]  # [T, dim]


class ChunkMerge(nn.Module):
    """The hypernetwork of MTLA: a merge weight per latent from its content and its chunk's index, and the
    running weighted sums inside each chunk. Low rank kv_lora_rank/4 as in the paper's code."""

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
    B, H, T, _ = q_c.shape
    s = down_rate
    scale = 1.0 / math.sqrt(q_c.shape[-1] + q_r.shape[-1])
    k, v = heads.expand(c)  # [B, H, T, D], [B, H, T, Dv]: every running sum's key and value
    q = torch.cat((q_c, q_r), dim=-1)  # [B, H, T, D + d_R]
    k = torch.cat((k, k_r.unsqueeze(1).expand(B, H, T, k_r.shape[-1])), dim=-1)  # [B, H, T, D + d_R]
    own = (q * k).sum(-1) * scale  # [B, H, T]: each query against its own running sum
    n = -(-T // s)  # chunks
    slots_k, slots_v = k[:, :, s - 1::s][:, :, :n - 1], v[:, :, s - 1::s][:, :, :n - 1]  # [B, H, n-1, ·]
    pad = n * s - T  # queries of a partial last chunk are padded to a whole one, then dropped

    def by_offset(t: Tensor) -> Tensor:  # [B, H, T, ·] -> [B, H·s, n, ·]: in-chunk offset r becomes a head
        t = F.pad(t, (0, 0, 0, pad)) if t.dim() == 4 else F.pad(t, (0, pad))
        return t.unflatten(2, (n, s)).transpose(2, 3).flatten(1, 2)

    y = attend_with_own_term(by_offset(q), slots_k, slots_v, by_offset(own), by_offset(v), is_causal=True,
                             scale=scale, dropout=dropout)  # [B, H·s, n, Dv]
    return y.unflatten(1, (H, s)).transpose(2, 3).flatten(2, 3)[:, :, :T]  # [B, H, T, Dv]


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
        self.skip.keep_float = True  # its weight's dtype sets the external table's (efficia.quantize)

    def zero_up(self) -> None:
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.silu(self.w1(x)) * self.w2(x)) + self.skip(x)


def load_external_table(source: str, key: str | None, vocab_size: int) -> Tensor:
    """A frozen per-token table [vocab, d_ext]: the token embeddings of another efficia checkpoint (.ckpt) or a
    matrix in a .safetensors file (`key` names it when the file holds several). Rows are token ids."""
    path = Path(source).expanduser()
    hint = "set model.external.source to an efficia .ckpt or a .safetensors matrix, or null for no adapter"
    if not path.is_file():
        raise ConfigError(f"efficientlm: external embedding source {path} does not exist; {hint}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if key is None and len(tensors) != 1:
            raise ConfigError(f"efficientlm: {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); "
                              "name one with model.external.key")
        table = tensors[key] if key is not None else next(iter(tensors.values()))
    else:
        from efficia.checkpoint import read_checkpoint

        weights = read_checkpoint(path)["state_dict"]
        name = key or "net.tok_emb.weight"
        if name not in weights:
            raise ConfigError(f"efficientlm: checkpoint {path} has no tensor {name!r}; name one with "
                              "model.external.key")
        table = weights[name]
    if table.dim() != 2 or table.shape[0] != vocab_size:
        raise ConfigError(f"efficientlm: external table in {path} has shape {tuple(table.shape)}, expected "
                          f"[{vocab_size}, d] (one row per token id of this tokenizer); use a table made with "
                          "the same tokenizer")
    return table.detach().float()


class TemporalLatentAttention(Mixer):
    """MTLA as a mixer: latent query/KV/heads from `latent.py`, the chunk merge and stride-aware mask from
    here. Training attends with per-head K/V expanded (SDPA); decoding with the weights absorbed, straight
    over the slots."""

    def __init__(self, d_model: int, n_head: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, down_rate: int, rope_theta: float, dropout: float, norm_eps: float) -> None:
        super().__init__()
        self.rank, self.rope_dim, self.down_rate = kv_lora_rank, qk_rope_head_dim, down_rate
        self.rope_theta, self.dropout = rope_theta, dropout
        self.query = LatentQuery(d_model, n_head, qk_nope_head_dim, qk_rope_head_dim, None, norm_eps=norm_eps)
        self.kv = LatentKV(d_model, kv_lora_rank, qk_rope_head_dim, norm_eps=norm_eps)
        self.heads = LatentHeads(n_head, kv_lora_rank, qk_nope_head_dim, v_head_dim)
        self.merge = ChunkMerge(kv_lora_rank, down_rate) if down_rate > 1 else None  # s=1: nothing to merge
        self.proj = nn.Linear(n_head * v_head_dim, d_model, bias=False)
        self.proj.is_residual_proj = True
        self.resid_dropout = Dropout(dropout)

    def forward(self, x: Tensor, step: Step, state: SlotState | None = None) -> Tensor:
        B, T, _ = x.shape
        start = step.start
        rope = step.rope(self.rope_dim, self.rope_theta)
        q_c, q_r = self.query(x, rope)  # [B, H, T, D], [B, H, T, d_R]
        c, k_r = self.kv(x, rope)  # [B, T, r], [B, T, d_R]
        if self.merge is not None:
            carry = state.carry(start) if state is not None else None
            c = self.merge.running_sums(c * self.merge.weights(c, start), start, carry)  # [B, T, r]
        dropout = self.dropout if self.training else 0.0
        if state is None and self.merge is None:
            y = self.heads.attend(q_c, q_r, c, k_r, absorbed=False, is_causal=True, dropout=dropout)
        elif state is None:
            require(start % self.down_rate == 0, "efficientlm: a forward without a cache starts at a chunk "
                    f"boundary, got start {start}; pass a state to continue a chunk")
            y = stride_aware_attention(self.heads, q_c, q_r, c, k_r, self.down_rate, dropout)
        else:
            prev_c, prev_r = state.complete(start)  # slots of the chunks finished before this call
            state.store(c, k_r, start)
            mask = stride_aware_mask(start, T, prev_c.shape[1], self.down_rate, x.device) if T > 1 else None
            c = torch.cat((prev_c.to(c.dtype), c), dim=1)  # [B, n_prev + T, r]
            k_r = torch.cat((prev_r.to(k_r.dtype), k_r), dim=1)  # [B, n_prev + T, d_R]
            y = self.heads.attend(q_c, q_r, c, k_r, absorbed=True, mask=mask, dropout=dropout)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)))  # [B, T, H·Dv] -> [B, T, C]

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> SlotState:
        return SlotState(batch_size, self.rank, self.rope_dim, self.down_rate, device, dtype)

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:
        return LatentState.nbytes(-(-seq_len // self.down_rate), self.rank, self.rope_dim, dtype)


@register("efficientlm")
class EfficientLM(DecoderLM):
    """Pre-norm MTLA blocks with SwiGLU (hidden 8/3·d), RMSNorm, learned absolute positions (in training and
    decoding alike), tied head, and the optional external-embedding adapter (`external.source`)."""

    def __init__(self, *, vocab_size: int, d_model: int, n_layer: int, n_head: int, max_seq_len: int,
                 dropout: float, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 down_rate: int, rope_theta: float, norm_eps: float, external: dict[str, Any],
                 gradient_checkpointing: bool) -> None:
        require(down_rate >= 1, f"efficientlm: down_rate must be >= 1, got {down_rate}; set model.down_rate")
        require(qk_rope_head_dim >= 2 and qk_rope_head_dim % 2 == 0,
                f"efficientlm: qk_rope_head_dim must be even and >= 2 (the decoupled RoPE key), got "
                f"{qk_rope_head_dim}")
        require(min(kv_lora_rank, qk_nope_head_dim, v_head_dim, n_head) >= 1,
                "efficientlm: kv_lora_rank, qk_nope_head_dim, v_head_dim and n_head must be >= 1")
        self.down_rate = down_rate
        table = None
        if external["source"] is not None:
            table = load_external_table(str(external["source"]), external["key"], vocab_size)
        hidden = 8 * d_model // 3

        def make_block(_: int) -> PreNormBlock:
            mixer = TemporalLatentAttention(d_model, n_head, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
                                            v_head_dim, down_rate, rope_theta, dropout, norm_eps)
            return PreNormBlock(RMSNorm(d_model, eps=norm_eps), mixer, RMSNorm(d_model, eps=norm_eps),
                                SwiGLU(d_model, hidden, dropout=dropout))

        super().__init__(name="efficientlm", vocab_size=vocab_size, d_model=d_model, n_layer=n_layer,
                         max_seq_len=max_seq_len, dropout=dropout, make_block=make_block,
                         make_norm=lambda: RMSNorm(d_model, eps=norm_eps), learned_positions=True,
                         tie_embeddings=True, bounded_context=True, gradient_checkpointing=gradient_checkpointing)
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

    def structure(self) -> dict[str, int]:
        return {"chunk": self.down_rate}
