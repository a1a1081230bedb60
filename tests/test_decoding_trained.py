"""Cached decoding equals the full forward on trained-like weights, for every model and flag variant.

tests/test_models.py checks the same contract on freshly initialised models, whose gates, merge weights
and pooling sit near neutral values: there a wrong slot, chunk index or gate moves the logits by less
than the tolerance. Here every parameter is re-drawn far from neutral (tests/trained_like.py) and the
model runs in float64, so the tolerance can be tight and any such bug shows.
"""

from __future__ import annotations

import pytest
import torch

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
