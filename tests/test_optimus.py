"""Optimus-specific tests: MLA's absorbed decoding equals the expanded path (prefill and token by token),
follows the weights after an optimizer step, never expands the latents, and its cache holds exactly
(d_c + d_R) numbers per position per layer. Generic contract tests (attention=mla and gqa) live in
test_models.py; the latent attention kernels themselves in test_latent.py."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from efficia.build import build_model
from efficia.config import compose_run
from efficia.errors import ConfigError
from efficia.models.decoder import Step
from efficia.models.latent import LatentHeads, LatentState
from efficia.models.optimus import MultiHeadLatentAttention
from tests.conftest import ROOT, build_tiny
from tests.trained_like import (
    assert_cached_calls_equal,
    assert_same_forward_and_grads,
    nbytes,
    randomise,
    saved_for_backward,
)

VOCAB = 41


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def tiny(*overrides: str, seed: int = 0):
    return build_tiny("optimus", *overrides, vocab_size=VOCAB, seed=seed).eval()


def decode(model, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a cached run: a prefill chunk, then one token at a time."""
    cache = model.new_cache(idx.shape[0])
    steps = [model(idx[:, :prefill], cache=cache)]
    steps += [model(idx[:, t:t + 1], cache=cache) for t in range(prefill, idx.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("prefill", [1, 7, 32])
def test_absorbed_decoding_equals_expanded(prefill: int) -> None:
    absorbed = tiny()
    expanded = tiny("model.decode=expanded")
    expanded.load_state_dict(absorbed.state_dict())
    idx = torch.randint(VOCAB, (2, absorbed.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = absorbed(idx)  # training path: expanded, causal SDPA, no cache
        a, e = decode(absorbed, idx, prefill), decode(expanded, idx, prefill)
    torch.testing.assert_close(a, e, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, full, atol=1e-5, rtol=0)


def test_absorbed_decoding_never_expands_the_latents(monkeypatch) -> None:
    model = tiny()
    idx = torch.randint(VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))

    def refuse(self, c_kv):
        raise AssertionError("per-head K/V built during absorbed decoding")

    monkeypatch.setattr(LatentHeads, "expand", refuse)
    with torch.no_grad():
        decode(model, idx, prefill=4)
    with pytest.raises(AssertionError, match="per-head"):
        model(idx)  # the training path does expand (sanity: the patch is live)


def test_absorbed_path_follows_the_weights_after_an_optimizer_step() -> None:
    model = tiny()
    idx = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = decode(model, idx, prefill=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    logits = model(idx[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after, full = decode(model, idx, prefill=3), model(idx)
    assert not torch.allclose(before, after, atol=1e-3), "the step should change the decoded logits"
    torch.testing.assert_close(after, full, atol=1e-5, rtol=0)


def test_cache_holds_exactly_latent_and_rope_key_per_position_per_layer() -> None:
    model = tiny()
    B, T = 3, 10
    mixer = model.blocks[0].mixer
    assert isinstance(mixer, MultiHeadLatentAttention)
    d_c, d_r = mixer.d_c, mixer.d_rope
    assert (d_c, d_r) == (16, 8)  # tiny: d 32 · ratio 0.5, head_dim 16 / 2
    cache = model.new_cache(B)
    with torch.no_grad():
        model(torch.randint(VOCAB, (B, 4)), cache=cache)
        for _ in range(T - 4):
            model(torch.randint(VOCAB, (B, 1)), cache=cache)
    for state in cache.layers:
        assert isinstance(state, LatentState)
        held = [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
        assert [tuple(t.shape) for t in held] == [(B, T, d_c), (B, T, d_r)]
        assert sum(t.numel() for t in held) == B * T * (d_c + d_r)
    assert model.cache_bytes(T) == model.n_layer * T * (d_c + d_r) * 4


def mla_mixer(d_q: int | None = 14, dropout: float = 0.0) -> MultiHeadLatentAttention:
    """d 24, 3 heads of 8 (+4 RoPE), latent 10: widths that tell the tensors apart. Trained-like, float64."""
    return randomise(MultiHeadLatentAttention(24, 3, 10, d_q, 4, 10000.0, dropout, "absorbed", 1e-6)).double()


def reference_mla_training(mixer: MultiHeadLatentAttention, x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The previous training formulation, kept as the reference: the latents, the joined [q_c | q_R] and
    [k_h | k_R] and the [B,T,H·D] output copy all kept for backward (no recomputation)."""
    rope = Step(start, x.shape[1], x.device).rope(mixer.d_rope, mixer.rope_theta)
    q_c, q_r = mixer.query(x, rope)
    c_kv, k_r = mixer.kv(x, rope)
    dropout = mixer.dropout if mixer.training else 0.0
    return mixer.out(mixer.heads.attend(q_c, q_r, c_kv, k_r, absorbed=False, is_causal=True, dropout=dropout))


def seeded(fn):
    """fn with the RNG reset first: both formulations draw the same dropout masks."""
    def run(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(7)
        return fn(x)
    return run


@pytest.mark.parametrize(("d_q", "dropout"), [(14, 0.0), (None, 0.0), (14, 0.3)])
@pytest.mark.parametrize("T", [1, 6, 33])
def test_training_path_equals_the_previous_formulation(T: int, d_q: int | None, dropout: float) -> None:
    """The recomputing training path gives the previous formulation's output and gradients (x and every
    weight) on trained-like weights, with dropout too (the recomputed output projection redraws the same
    mask); cached calls over the same tokens (a prefill, then chunks) give its output too."""
    mixer = mla_mixer(d_q, dropout)
    x = torch.randn(2, T, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    assert_same_forward_and_grads(mixer, seeded(lambda xi: mixer(xi, Step(0, T, xi.device))),
                                  seeded(lambda xi: reference_mla_training(mixer, xi)), x)
    mixer.eval()
    with torch.no_grad():
        want = reference_mla_training(mixer, x)
    assert_cached_calls_equal(mixer, x, want)


def test_training_keeps_only_the_attention_tensors_for_backward() -> None:
    """Between forward and backward a training call keeps its input x and SDPA's per-head tensors
    ([B,H,T,·] and the log-sum-exp [B,H,T]), nothing of the latents' widths nor a [B,T,H·D] copy: those are
    recomputed in backward. The previous formulation kept both."""
    mixer = mla_mixer().float()
    B, T, H = 2, 40, 3
    x = torch.randn(B, T, 24, requires_grad=True)
    step = Step(0, T, x.device)
    kept = saved_for_backward(mixer, x, step)
    previous = saved_for_backward(reference_mla_training, mixer, x)
    per_head = [t for t in kept if t.shape[:3] == (B, H, T)]
    own = {t.untyped_storage().data_ptr() for t in (x, *mixer.parameters())}
    others = [tuple(t.shape) for t in kept if t.shape[:3] != (B, H, T) and t.untyped_storage().data_ptr() not in own]
    assert not others, f"kept for backward besides x and SDPA's tensors: {others}"
    assert nbytes(kept) < nbytes(previous) - B * T * (10 + 14 + 14) * 4  # the latents alone were that much
    assert per_head


def seed_sized(*overrides: str):
    cfg = compose_run(["model=optimus", "scale=seed", "model.n_layer=1", *overrides], ROOT / "outputs" / "unused")
    return build_model(OmegaConf.to_container(cfg.model, resolve=True), 8)


def test_seed_sizes_cache_ratio_against_mha_and_gqa() -> None:
    """At the seed sizes MLA keeps (384 + 32) numbers per position per layer against MHA's 2·768: 0.27."""
    mla = seed_sized()
    mixer = mla.blocks[0].mixer
    assert (mixer.d_c, mixer.d_rope, mixer.head_dim) == (384, 32, 64)
    mha = seed_sized("model.attention=gqa", "model.n_kv_head=null")
    gqa = seed_sized("model.attention=gqa")
    assert mla.cache_bytes(1024) / mha.cache_bytes(1024) == pytest.approx((384 + 32) / (2 * 768))
    assert gqa.cache_bytes(1024) / mha.cache_bytes(1024) == pytest.approx(2 / 12)


@pytest.mark.parametrize(("override", "message"), [
    ("model.attention=linear", "attention must be 'mla' or 'gqa', got 'linear'"),
    ("model.decode=fast", "decode must be 'absorbed' or 'expanded', got 'fast'"),
    ("model.rope_dim=3", "rope_dim must be even and >= 2, got 3"),
    ("model.kv_rank=0", "kv_rank must be >= 1, got 0"),
    ("model.n_kv_head=2", "n_kv_head=2 is read by attention=gqa only"),
    ("model.attention=gqa model.kv_rank=8", "kv_rank are read by attention=mla only; set model.kv_rank=null"),
])
def test_bad_settings_are_clear_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny(*override.split())


def test_experiment_recipe(make_cfg) -> None:
    cfg = make_cfg("experiment=optimus_wikipedia")
    assert (cfg.model.name, cfg.model.attention, cfg.model.d_model, cfg.model.n_layer, cfg.model.n_head) == (
        "optimus", "mla", 768, 8, 12)
    assert cfg.model.max_seq_len == 2048 and cfg.model.dropout == 0.15 and cfg.model.gradient_checkpointing
    assert (cfg.tokenizer.encoding, cfg.data.seq_len, cfg.data.batch_size) == ("gpt2", 64, 64)
    assert cfg.data._target_.endswith("WikipediaDataModule")
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.trainer.gradient_clip_val) == (1e-3, 0.01, 1.0)
    assert cfg.scheduler.warmup_steps * 10 == cfg.trainer.max_steps
    assert (cfg.sampling.temperature, cfg.sampling.top_p) == (0.7, 0.9)
