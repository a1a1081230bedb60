"""The model contract, proven for every registered architecture and each of its flag variants (new
models are covered automatically; a new flag adds a line to VARIANTS).

Each model is built from its own conf/model/<name>.yaml at scale=tiny (with its conf/model_scale
tiny sizes), so the yaml is tested too.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from efficia.build import build_model
from efficia.config import compose_run
from efficia.errors import ConfigError
from efficia.models import MODELS
from tests.conftest import CONF, EXTERNAL_TABLE, ROOT, TINY_VOCAB, build_tiny, tiny_model_cfg

VOCAB = TINY_VOCAB
# Flag variants that must keep the contract too (x-transformers' one-flag-one-test, per flag).
VARIANTS: dict[str, list[tuple[str, ...]]] = {
    "efficia": [(), ("model.segment=5",), ("model.mem_size=1", "model.conv_size=1"), ("model.mem_size=9",)],
    "efficientlm": [(), ("model.down_rate=1",), ("model.down_rate=2",), ("model.down_rate=4",),
                    (f"model.external.source={EXTERNAL_TABLE}",)],
    "gpt": [(), ("model.n_kv_head=1",), ("model.pos_emb=learned",), ("model.dropout=0.2", "model.n_kv_head=1")],
    "optimus": [(), ("model.decode=expanded",), ("model.attention=gqa",), ("model.attention=gqa", "model.n_kv_head=1")],
    "yinggem": [(), ("model.n_kv_head=1",), ("model.window=3",)],
    "lumenspark": [(), ("model.block=5", "model.k_per_block=3"),
                   ("model.block=4", "model.k_per_block=1", "model.n_kv_head=null")],
}
# The periodic sub-structure of each model that has one, as its config key: yinggem's attention window, efficia's
# segment, lumenspark's block, efficientlm's chunk of merged positions. Tests must cross every boundary.
STRUCTURES = {"yinggem": "window", "efficia": "segment", "lumenspark": "block", "efficientlm": "down_rate"}
CASES = [(name, variant) for name in sorted(MODELS) for variant in VARIANTS.get(name, [()])]
CASE_IDS = [f"{name}[{' '.join(v) or 'default'}]" for name, v in CASES]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request) -> tuple[str, tuple[str, ...]]:
    return request.param


@pytest.fixture(params=sorted(MODELS))
def name(request) -> str:
    return request.param


def test_every_registered_model_has_a_yaml(name: str) -> None:
    assert (CONF / "model" / f"{name}.yaml").is_file()
    assert build_tiny(name).registry_name == name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_causal(case, mode: str) -> None:
    name, variant = case
    assert_causal(build_tiny(name, *variant), name, mode)


def assert_causal(model: torch.nn.Module, name: str, mode: str) -> None:
    """Changing tokens from position j on never changes logits before j, at every length tried.
    (Also run on a deliberately non-causal model, tests/test_lumenspark.py, to show it catches a leak.)"""
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
def test_cached_decoding_equals_full_forward(case, prefill: int) -> None:
    model = build_tiny(case[0], *case[1]).eval()
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


def test_cached_chunks_equal_full_forward(case) -> None:
    """A cache fed several multi-token chunks (not just single tokens) still matches the full forward."""
    model = build_tiny(case[0], *case[1]).eval()
    T = model.max_seq_len
    idx = torch.randint(VOCAB, (2, T), generator=torch.Generator().manual_seed(4))
    cuts = [0, 3, T // 2, T - 2, T]
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2)
        parts = [model(idx[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from a cache object (attributes, lists, tuples, dicts), each once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if obj.data_ptr() in seen:
            return 0
        seen.add(obj.data_ptr())
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return tensor_bytes(vars(obj), seen)
    return 0


def test_cache_bytes_is_what_the_cache_really_holds(case) -> None:
    """cache_bytes(T) per sequence equals the bytes of the tensors a real cache holds after T tokens, at every T
    (a cache that reserves capacity ahead, e.g. gpt's doubling K/V buffers, must report what it reserved)."""
    model = build_tiny(case[0], *case[1]).eval()
    B, T = 2, model.max_seq_len
    idx = torch.randint(VOCAB, (B, T), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache(B)
    with torch.no_grad():
        for t in range(T):
            model(idx[:, t:t + 1], cache=cache)
            assert tensor_bytes(cache) == B * model.cache_bytes(t + 1), f"after {t + 1} tokens"
    assert 0 < model.cache_bytes(1) <= model.cache_bytes(T)


def test_cache_batch_size_is_checked(name: str) -> None:
    model = build_tiny(name)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(3, 1, dtype=torch.long), cache=model.new_cache(2))


def test_parameter_count_excludes_every_vocabulary_table(name: str) -> None:
    model = build_tiny(name)
    n = model.num_params()
    assert n == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) > 0
    vocab_tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    if model.lm_head.weight is not model.tok_emb.weight:
        vocab_tables += model.lm_head.weight.numel()
    assert model.num_params(exclude_embeddings=True) == n - vocab_tables


def test_tied_and_untied_heads_count_the_same_non_embedding_parameters() -> None:
    """gpt ties its head, yinggem does not: excluding embeddings must treat both alike."""
    tied = build_tiny("gpt")
    untied = build_tiny("gpt")
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert untied.num_params() == tied.num_params() + untied.lm_head.weight.numel()
    assert untied.num_params(exclude_embeddings=True) == tied.num_params(exclude_embeddings=True)


def test_tiny_sequences_cross_every_structure_several_times(name: str) -> None:
    """At scale=tiny the training context spans each window/segment/block/chunk at least 3 times, so the
    generic tests above exercise every boundary."""
    cfg = tiny_model_cfg(name)
    if name in STRUCTURES:
        part, length = STRUCTURES[name], cfg["max_seq_len"]
        assert 1 <= cfg[part] and 3 * cfg[part] <= length, f"{name}: {part}={cfg[part]} vs max_seq_len {length}"


def test_small_scale_models_are_gpt_sized(name: str) -> None:
    """scale=small compares like with like: every model within ±15% of gpt's parameters (char vocabulary)."""
    def params(model_name: str) -> int:
        cfg = compose_run([f"model={model_name}", "scale=small"], ROOT / "outputs" / "unused")
        return build_model(OmegaConf.to_container(cfg.model, resolve=True), 65).num_params()

    assert abs(params(name) / params("gpt") - 1) <= 0.15


def test_gradient_checkpointing_flag_changes_nothing_but_memory(name: str) -> None:
    idx = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    grads = []
    for flag in (False, True):
        model = build_tiny(name, f"model.gradient_checkpointing={flag}").train()
        loss = model(idx).logsumexp(-1).mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_dropout_reaches_every_place_it_is_configured_for(name: str) -> None:
    """model.dropout is the rate of the embedding's dropout and of every block's mixer output and feed-forward
    output (docs/architectures.md's shared names): in train mode about that share of each is exactly zero, in eval
    mode none. A feed-forward (or mixer) that ignored the setting would train without it, silently."""
    model = build_tiny(name, "model.dropout=0.5")
    places = {"embedding": model.drop, **{f"blocks.{i}.{part}": getattr(block, part) for i, block in
                                          enumerate(model.blocks) for part in ("mixer", "ffn")}}
    outputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda m, i, out, where=where: outputs.__setitem__(
        where, out[0] if isinstance(out, tuple) else out)) for where, module in places.items()]
    idx = torch.randint(VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    try:
        for training, share in ((True, 0.5), (False, 0.0)):
            model.train(training)
            torch.manual_seed(1)
            model(idx)
            zeros = {where: (out == 0).float().mean().item() for where, out in outputs.items()}
            assert zeros.keys() == places.keys()
            assert all(abs(z - share) < 0.05 for z in zeros.values()), (training, zeros)
    finally:
        for hook in hooks:
            hook.remove()


# --- bad settings: one clear line ------------------------------------------------------------------


DELETE = object()


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown model 'nope'; registered models: .*gpt"):
        build_model({"name": "nope"}, VOCAB)


@pytest.mark.parametrize(("change", "message"), [
    ({"n_head": DELETE}, "model=gpt: missing key.s. n_head"),
    ({"heads": 4}, "model=gpt: unknown key.s. heads"),
    ({"n_head": 3}, r"d_model \(32\) must be divisible by n_head \(3\)"),
    ({"pos_emb": "alibi"}, "pos_emb must be 'learned' or 'rope', got 'alibi'"),
    ({"n_kv_head": 3}, r"n_kv_head \(3\) must divide n_head"),
    ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
])
def test_bad_model_settings_are_clear_errors(change: dict, message: str) -> None:
    cfg = OmegaConf.to_container(compose_run(["model=gpt", "scale=tiny"], ROOT / "outputs" / "unused").model)
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not DELETE}
    with pytest.raises(ConfigError, match=message):
        build_model(cfg, VOCAB)


def test_yinggem_zero_window_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="window must be >= 1, got 0"):
        build_tiny("yinggem", "model.window=0")


def test_type_error_inside_a_constructor_is_not_called_a_yaml_problem(monkeypatch) -> None:
    """Only key mismatches are reported as config problems; a bug inside a constructor keeps its trace."""
    import efficia.models.gpt as gpt_module

    def broken(*args, **kwargs):
        raise TypeError("bug inside the model")

    monkeypatch.setattr(gpt_module, "MLP", broken)
    with pytest.raises(TypeError, match="bug inside the model"):
        build_tiny("gpt")

