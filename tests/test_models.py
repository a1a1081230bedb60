"""The model contract, proven for every registered architecture (new models are covered automatically).

Each model is built from its own conf/model/<name>.yaml at scale=tiny, so the yaml is tested too.
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from efficia.models import MODELS, build_model
from efficia.models.blocks import LanguageModel
from tests.conftest import CONF

VOCAB = 37
# Sub-structure sizes (windows, segments, blocks) shrunk so that tiny sequences cross several of them.
STRUCTURE_OVERRIDES: dict[str, list[str]] = {
    "yinggem": ["model.window=8"],
}


def tiny_model_cfg(name: str, *extra: str) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"model={name}", "scale=tiny", *STRUCTURE_OVERRIDES.get(name, []),
                                          *extra])
    return OmegaConf.to_container(cfg.model, resolve=True)


def tiny_model(name: str, *extra: str) -> LanguageModel:
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(name, *extra), VOCAB)


@pytest.fixture(params=sorted(MODELS))
def name(request) -> str:
    return request.param


def test_every_registered_model_has_a_yaml(name: str) -> None:
    assert (CONF / "model" / f"{name}.yaml").is_file()
    assert tiny_model_cfg(name)["name"] == name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_causal(name: str, mode: str) -> None:
    """Changing tokens from position j on never changes logits before j, at every length tried."""
    model = tiny_model(name)
    model.train(mode == "train")
    max_len = model.max_seq_len
    gen = torch.Generator().manual_seed(1)
    for T in sorted({2, max_len // 2 + 1, max_len}):
        idx = torch.randint(VOCAB, (2, T), generator=gen)
        for j in sorted({1, T // 3, T - 1}):
            changed = idx.clone()
            changed[:, j:] = torch.randint(VOCAB, (2, T - j), generator=gen)
            assert not torch.equal(changed, idx)
            torch.manual_seed(3)
            a = model(idx)
            torch.manual_seed(3)
            b = model(changed)
            assert a.shape == (2, T, VOCAB)
            torch.testing.assert_close(a[:, :j], b[:, :j], atol=1e-5, rtol=0,
                                       msg=f"{name}: position < {j} saw tokens at >= {j} (T={T}, {mode})")
            assert not torch.allclose(a[:, j:], b[:, j:]), "the suffix change should change later logits"


@pytest.mark.parametrize("prefill", [1, 5])
def test_cached_decoding_equals_full_forward(name: str, prefill: int) -> None:
    model = tiny_model(name).eval()
    T = model.max_seq_len
    idx = torch.randint(VOCAB, (3, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(3)
        steps = [model(idx[:, :prefill], cache=cache)]
        assert cache.pos == prefill
        for t in range(prefill, T):
            steps.append(model(idx[:, t:t + 1], cache=cache))
        assert cache.pos == T
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_cached_chunks_equal_full_forward(name: str) -> None:
    """A cache fed several multi-token chunks (not just single tokens) still matches the full forward."""
    model = tiny_model(name).eval()
    T = model.max_seq_len
    idx = torch.randint(VOCAB, (2, T), generator=torch.Generator().manual_seed(4))
    cuts = [0, 3, T // 2, T - 2, T]
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2)
        parts = [model(idx[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_parameter_count_and_cache_bytes(name: str) -> None:
    model = tiny_model(name)
    n = model.num_params()
    assert n == sum(p.numel() for p in model.parameters()) > 0
    assert 0 < model.num_params(exclude_embeddings=True) < n
    assert 0 < model.cache_bytes(8) <= model.cache_bytes(model.max_seq_len)


def test_gradient_checkpointing_flag_changes_nothing_but_memory(name: str) -> None:
    idx = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    grads = []
    for flag in (False, True):
        model = tiny_model(name, f"model.gradient_checkpointing={flag}").train()
        loss = model(idx).logsumexp(-1).mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_unknown_model_name_is_a_clear_error() -> None:
    from efficia.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model 'nope'; registered models: .*gpt"):
        build_model({"name": "nope"}, VOCAB)


def test_missing_size_is_a_clear_error() -> None:
    from efficia.errors import ConfigError

    cfg = tiny_model_cfg("gpt")
    del cfg["n_head"]
    with pytest.raises(ConfigError, match="model=gpt: .*n_head"):
        build_model(cfg, VOCAB)
