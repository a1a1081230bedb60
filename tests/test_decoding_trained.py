"""Cached decoding equals the full forward on trained-like weights, for every model and flag variant.

tests/test_models.py checks the same contract on freshly initialised models, whose gates, merge weights
and pooling sit near neutral values: there a wrong slot, chunk index or gate moves the logits by less
than the tolerance. Here every parameter is re-drawn far from neutral (tests/trained_like.py) and the
model runs in float64, so the tolerance can be tight and any such bug shows.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from efficia.models import attention
from efficia.models.attention import KVState, reserved_positions
from tests.conftest import TINY_VOCAB, build_tiny
from tests.test_models import CASE_IDS, CASES
from tests.trained_like import randomise

B = 2


def trained_like(name: str, variant: tuple[str, ...]) -> torch.nn.Module:
    return randomise(build_tiny(name, *variant)).double().eval()


def tokens(model: torch.nn.Module, seed: int) -> torch.Tensor:
    """Two different rows (a batch-index bug shows too), one training context long."""
    return torch.randint(TINY_VOCAB, (B, model.max_seq_len), generator=torch.Generator().manual_seed(seed))


def decode(model: torch.nn.Module, idx: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Logits of idx fed through one cache in the chunks idx[:, cuts[i]:cuts[i+1]]."""
    cache = model.new_cache(idx.shape[0])
    with torch.no_grad():
        parts = [model(idx[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert cache.pos == cuts[-1]
    return torch.cat(parts, dim=1)


def assert_matches(name: str, cached: torch.Tensor, full: torch.Tensor, what: str) -> None:
    err = (cached - full).abs().amax(dim=(0, 2))  # per position
    assert full.abs().amax() > 1.0, "trained-like logits should be far from zero"
    bad = (err > 1e-8 * full.abs().amax()).nonzero().flatten().tolist()
    assert not bad, f"{name} ({what}): cached logits differ from the full forward from position {bad[0]} on " \
                    f"(max error {err.max():.3g})"


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request) -> tuple[str, tuple[str, ...]]:
    return request.param


def model_and_forward(case: tuple[str, tuple[str, ...]], seed: int):
    """A trained-like model of this case, its test tokens and their full forward (the reference)."""
    name, variant = case
    model = trained_like(name, variant)
    idx = tokens(model, seed=seed)
    with torch.no_grad():
        return name, model, idx, model(idx)


def test_single_token_decoding_equals_full_forward(case, one_thread) -> None:
    """Prefill 1 and 5 tokens, then one token at a time to the end of the context."""
    name, model, idx, full = model_and_forward(case, seed=11)
    for prefill in (1, 5):
        assert_matches(name, decode(model, idx, [0, *range(prefill, idx.shape[1] + 1)]), full, f"prefill {prefill}")


def test_chunked_decoding_equals_full_forward(case, one_thread) -> None:
    """Multi-token chunks of uneven sizes, so chunk edges fall inside and across every window, segment,
    block and merge chunk (tiny structures are 3..8 tokens)."""
    name, model, idx, full = model_and_forward(case, seed=12)
    T = idx.shape[1]
    for cuts in ([0, 2, 7, 8, 13, 22, 23, T], [0, 9, 10, 11, 20, T - 1, T], [0, T - 1, T]):
        assert_matches(name, decode(model, idx, cuts), full, f"chunks {cuts}")


def test_trained_like_weights_are_far_from_neutral() -> None:
    """The premise of this file: after `randomise`, efficia's fusion softmax and gates and MTLA's merge
    weights are far from their init values (uniform, 0.5)."""
    x = torch.randn(2, 16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    efficia = trained_like("efficia", ())
    fuse = torch.softmax(efficia.blocks[0].mixer.fuse(x), dim=-1)
    assert (fuse - 1 / 3).abs().mean() > 0.1
    mtla = trained_like("efficientlm", ()).blocks[0].mixer
    c = mtla.kv(x)[0]
    assert mtla.merge.weights(c, 0).std() > 0.1


# -- the growing K/V cache (gpt, optimus attention=gqa) against its previous formulation --------------

class ConcatKVState:
    """The previous KVState, kept as the reference: the whole cache re-made by torch.cat on every call."""

    def __init__(self, batch_size: int, n_kv_head: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 limit: int | None = None) -> None:
        self.k = torch.zeros(batch_size, n_kv_head, 0, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k: Tensor, v: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        self.k = torch.cat((self.k, k.to(self.k.dtype)), dim=2)
        self.v = torch.cat((self.v, v.to(self.v.dtype)), dim=2)
        return self.k, self.v


FULL_CACHE_CASES = [("gpt", ()), ("gpt", ("model.n_kv_head=1",)), ("gpt", ("model.pos_emb=learned",)),
                    ("gpt", ("model.max_seq_len=23",)), ("optimus", ("model.attention=gqa", "model.n_kv_head=1"))]


@pytest.mark.parametrize("full_case", FULL_CACHE_CASES, ids=[f"{n}[{' '.join(v) or 'default'}]"
                                                              for n, v in FULL_CACHE_CASES])
def test_growing_kv_cache_equals_the_concatenated_one(full_case, monkeypatch, one_thread) -> None:
    """Same logits through the preallocated cache as through the torch.cat one, token by token and in
    chunks whose edges fall on and across the capacity steps (1, 2, 4, 8, 16, ... and max_seq_len)."""
    name, model, idx, full = model_and_forward(full_case, seed=13)
    T = idx.shape[1]
    schedules = [[*range(T + 1)], *([c for c in cuts if c < T] + [T] for cuts in ([0, 3, 4, 5, 9, 16, 17, 22],
                                                                                [0, 7, 8, 15, 30], [0]))]
    grown = [decode(model, idx, cuts) for cuts in schedules]
    monkeypatch.setattr(attention, "KVState", ConcatKVState)
    for cuts, logits in zip(schedules, grown, strict=True):
        reference = decode(model, idx, cuts)
        torch.testing.assert_close(logits, reference, rtol=0, atol=1e-12, msg=f"chunks {cuts}")
        assert_matches(name, logits, full, f"chunks {cuts}")


@pytest.mark.parametrize("limit", [None, 23])
def test_kv_cache_grows_by_doubling_and_writes_in_place(limit: int | None) -> None:
    """Keys/values equal the concatenated reference after every call (trained-like scale, a float64 input
    cast to the float32 cache), capacity is `reserved_positions` of the length (a power of two, capped at
    `limit`), and the buffers are re-allocated once per capacity step, not once per token."""
    gen = torch.Generator().manual_seed(0)
    state, reference = KVState(2, 3, 4, torch.device("cpu"), torch.float32, limit), ConcatKVState(2, 3, 4, "cpu",
                                                                                                   torch.float32)
    chunks = [1, 1, 2, 3, 1, 5, 1, 1, 8] + ([] if limit else [2, *[1] * 40, 17])  # up to the limit, or past 64
    pos, buffers = 0, set()
    for n in chunks:
        k, v = (3 * torch.randn(2, 3, n, 4, generator=gen, dtype=torch.float64) for _ in range(2))
        got, want = state.update(k, v, pos), reference.update(k, v, pos)
        pos += n
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"after {pos} positions"
        assert state.k_buf.shape[2] == state.v_buf.shape[2] == reserved_positions(pos, limit), pos
        buffers.add(state.k_buf.data_ptr())
    assert len(buffers) == len({reserved_positions(p, limit) for p in range(1, pos + 1)})
    assert reserved_positions(23, 23) == 23 and reserved_positions(17, None) == 32
    with pytest.raises(ValueError, match=f"holds {pos} positions but the call starts at 5"):
        state.update(k[:, :, :1], v[:, :, :1], 5)
