"""The model contract and the one decoder skeleton every architecture inherits.

    idx[B,T] -> tok_emb (+ pos_emb) -> dropout -> blocks(x, step, state_i) -> norm -> lm_head -> logits[B,T,V]
    training and validation stop at norm: hidden[B,T,C] + head weight -> output.linear_cross_entropy (no logits)

What varies between architectures is the *mixer* (the token-mixing half of a block: its projections,
its kernel and its own decoding state). The skeleton owns everything else: embeddings, the length and
cache checks, the single `Cache` object that `generate()` and the contract tests see, gradient
checkpointing, init, and the tied or untied head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from efficia.models.construction import init_weights, mark_residual, require
from efficia.models.layers import Dropout, PreNormBlock, rope_tables

# optimizer=muon's hidden matrices shared by several models: the gated feed-forward's three, and latent attention's
# (efficia/models/latent.py) down- and up-projections, W_uk and W_uv included (absorbed into the query and output
# only when decoding; in training they are plain maps)
LATENT_ATTENTION_MATRICES = ("blocks.*.mixer.query.down.weight", "blocks.*.mixer.query.up.weight",
                             "blocks.*.mixer.kv.down.weight", "blocks.*.mixer.heads.uk.weight",
                             "blocks.*.mixer.heads.uv.weight")
GATED_FFN_MATRICES = ("blocks.*.ffn.gate.weight", "blocks.*.ffn.up.weight", "blocks.*.ffn.down.weight")


@dataclass
class Step:
    """What a layer may know about this call: the absolute position of its first token and its length.
    RoPE tables are made once per (dim, theta) per call and shared by every layer that asks."""

    start: int
    length: int
    device: torch.device
    _tables: dict[tuple[int, float], tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def rope(self, dim: int, theta: float) -> tuple[Tensor, Tensor]:
        key = (dim, theta)
        if key not in self._tables:
            self._tables[key] = rope_tables(dim, theta, self.start, self.length, self.device)
        return self._tables[key]


class Cache:
    """A model's decoding state: one object per layer, each owned (made, read, written) by that layer's
    mixer, plus `pos`, the absolute position of the next token. The model advances `pos` after a call."""

    def __init__(self, batch_size: int, layers: list[Any]) -> None:
        self.batch_size = batch_size
        self.layers = layers
        self.pos = 0


class Mixer(nn.Module):
    """The token-mixing half of a block. `forward(x[B,T,C], step, state)` with `state` None in training
    (the whole sequence at once) or this layer's object from `new_state`, which the call updates in place.

    `add_output` and `out` are the output projection every mixer ends with, wired once: a residual-marked
    `proj` (scaled init) and `resid_dropout`."""

    def add_output(self, d_in: int, d_model: int, dropout: float, bias: bool = False) -> None:
        self.proj = mark_residual(nn.Linear(d_in, d_model, bias=bias))
        self.resid_dropout = Dropout(dropout)

    def out(self, y: Tensor) -> Tensor:
        """Per-head outputs y[B,H,T,D] (or features [B,T,d_in]) -> the residual branch [B,T,C]."""
        if y.dim() == 4:
            y = y.transpose(1, 2).flatten(2)  # [B, T, H·D]
        return self.resid_dropout(self.proj(y))

    def forward(self, x: Tensor, step: Step, state: Any = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any:  # pragma: no cover
        raise NotImplementedError

    def state_bytes(self, seq_len: int, dtype: torch.dtype) -> int:  # pragma: no cover
        """Bytes this layer's state holds for one sequence after `seq_len` tokens."""
        raise NotImplementedError


class LanguageModel(nn.Module):
    """The contract every architecture keeps.

    forward(idx[B,T], cache=None) -> logits[B,T,V]; with a cache from `new_cache`, the call
    continues at `cache.pos` and advances it. `max_context` is the longest sequence the
    model can attend over in one cache (None: unbounded, e.g. a rolling window).
    """

    registry_name: ClassVar[str] = ""  # the `model=` name, set by @register
    inputs: ClassVar[tuple[str, ...]] = ()  # constructor tensors that are not config keys (efficia.build reads them)
    max_context: int | None = None
    max_seq_len: int
    # optimizer=muon (efficia/training/muon.py, docs/muon.md): the parameters of 2+ dimensions Muon trains (hidden
    # weight matrices) and those that stay on AdamW (tables, the head, score read-outs, filters), as patterns over
    # parameter names (`*`: one name part, e.g. a block index). A matrix matching neither is refused, so a new one
    # is placed on purpose; parameters of fewer dimensions (norms, gains, biases) are always AdamW's.
    muon_matrices: ClassVar[tuple[str, ...]] = ()
    adamw_matrices: ClassVar[tuple[str, ...]] = ()

    def new_cache(self, batch_size: int) -> Cache:  # pragma: no cover - every model overrides
        raise NotImplementedError

    def cache_bytes(self, seq_len: int) -> int:  # pragma: no cover
        """Bytes the decoding cache holds for one sequence after `seq_len` tokens."""
        raise NotImplementedError

    def last_logits(self, idx: Tensor, cache: Cache | None = None) -> Tensor:
        """Logits [B, V] of the last position (decoding); a model may skip the other positions' logits."""
        return self(idx, cache)[:, -1]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each counted once. `exclude_embeddings` leaves out every vocabulary-sized or
        position table (token and position embeddings and the output head, tied or not)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for table in self.embedding_tables():
                params.pop(id(table), None)
        return sum(p.numel() for p in params.values())

    def embedding_tables(self) -> list[Tensor]:
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class DecoderLM(LanguageModel):
    """Embeddings, pre-norm blocks (`PreNormBlock(norm, mixer, norm, ffn)`), final norm, head. A subclass checks
    its own settings and passes three factories: `mixer(layer_index)`, `ffn()` and `norm()`. Its registry name
    (`@register`) names it in messages.

    Class settings a subclass may change (gpt sets `learned_positions` from its config):
    `learned_positions`: add a learned position table (then the context is bounded by max_seq_len).
    `bounded_context`: the mixers cannot attend past max_seq_len (a full KV cache); otherwise any length
    runs, through training-free extrapolation (RoPE) or a constant-size state.
    The constructor's `tie_embeddings` (every model's yaml key of that name): the head shares the token
    embedding matrix.
    """

    learned_positions: bool = False
    bounded_context: bool = True
    muon_matrices = ("blocks.*.mixer.proj.weight",)  # every mixer's output projection (Mixer.add_output)
    adamw_matrices = ("tok_emb.weight", "pos_emb.weight", "lm_head.weight")  # tables and the head: rows per token

    def __init__(self, vocab_size: int, d_model: int, n_layer: int, max_seq_len: int, dropout: float,
                 gradient_checkpointing: bool, *, mixer: Callable[[int], nn.Module], ffn: Callable[[], nn.Module],
                 norm: Callable[[], nn.Module], tie_embeddings: bool = True) -> None:
        super().__init__()
        name = self.name = type(self).registry_name or type(self).__name__.lower()
        require(d_model >= 1 and n_layer >= 1 and max_seq_len >= 1 and vocab_size >= 1,
                f"model={name}: d_model, n_layer, max_seq_len and vocab_size must be >= 1 "
                f"(got {d_model}, {n_layer}, {max_seq_len}, {vocab_size})")
        require(0.0 <= dropout < 1.0, f"model={name}: dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_layer, self.max_seq_len = d_model, n_layer, max_seq_len
        self.max_context = max_seq_len if (self.bounded_context or self.learned_positions) else None
        self.gradient_checkpointing = gradient_checkpointing
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model) if self.learned_positions else None
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(PreNormBlock(norm(), mixer(i), norm(), ffn()) for i in range(n_layer))
        self.norm = norm()
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        init_weights(self, n_layer)

    def embedding_tables(self) -> list[Tensor]:
        return [*super().embedding_tables(), self.lm_head.weight]

    def new_cache(self, batch_size: int) -> Cache:
        return Cache(batch_size, [block.mixer.new_state(batch_size, self.device, self.param_dtype)
                                  for block in self.blocks])

    def cache_bytes(self, seq_len: int) -> int:
        return sum(block.mixer.state_bytes(seq_len, self.param_dtype) for block in self.blocks)

    def embed(self, idx: Tensor, step: Step) -> Tensor:
        """Token (+ learned position) embeddings. A subclass may add its own per-token inputs here."""
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(step.start, step.start + step.length, device=idx.device))
        return x

    @property
    def head_weight(self) -> Tensor:
        """The output projection [V, C] (the token embedding when tied), for the fused loss."""
        return self.lm_head.weight

    def forward(self, idx: Tensor, cache: Cache | None = None) -> Tensor:
        return self.lm_head(self.hidden(idx, cache))

    def last_logits(self, idx: Tensor, cache: Cache | None = None) -> Tensor:
        """Logits [B, V] of the last position only: what decoding needs, without a [B, T, V] prefill."""
        return self.lm_head(self.hidden(idx, cache)[:, -1])

    def hidden(self, idx: Tensor, cache: Cache | None = None) -> Tensor:
        """The final hidden states [B, T, C] (after the final norm): the output layer's input."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"{self.name}: cache was made for batch size {cache.batch_size}, got {B}")
        if self.max_context is not None and start + T > self.max_context:
            raise ValueError(f"{self.name}: sequence of {start + T} tokens exceeds max_seq_len={self.max_seq_len}")
        step = Step(start, T, idx.device)
        x = self.drop(self.embed(idx, step))
        states = cache.layers if cache is not None else [None] * len(self.blocks)
        remat = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for block, state in zip(self.blocks, states, strict=True):
            x = checkpoint(block, x, step, use_reentrant=False) if remat else block(x, step, state)
        if cache is not None:
            cache.pos += T
        return self.norm(x)
