"""efficientlm: MTLA's chunk merge, stride-aware mask and slot cache against their definitions, down_rate=1
against optimus's MLA on the same weights, and the external-embedding adapter (causal, frozen, sourced from a
.safetensors matrix or another efficia checkpoint). The model contract itself runs in test_models.py."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from efficia.build import build_model
from efficia.config import compose_run
from efficia.errors import ConfigError
from efficia.models.efficientlm import ChunkMerge, TemporalLatentAttention, stride_aware_attention, stride_aware_mask
from efficia.models.optimus import MultiHeadLatentAttention
from tests.conftest import EXTERNAL_TABLE, ROOT, TINY_VOCAB, build_tiny, write_external_table
from tests.trained_like import assert_cached_calls_equal, assert_same_forward_and_grads, nbytes, saved_for_backward

EXTERNAL = f"model.external.source={EXTERNAL_TABLE}"


@pytest.mark.parametrize("s", [2, 3, 4])
@pytest.mark.parametrize("start", [0, 1, 5])
def test_running_sums_are_in_chunk_prefix_sums(s: int, start: int) -> None:
    """running[j] = sum of u over j's chunk up to j (absolute chunks), continuing a carried partial slot."""
    merge = ChunkMerge(8, s)
    u = torch.randn(2, 11, 8, generator=torch.Generator().manual_seed(s + start))
    carry = torch.randn(2, 8) if start % s else None
    out = merge.running_sums(u, start, carry)
    for j in range(u.shape[1]):
        pos = start + j
        first = max(start, pos - pos % s)  # first position of this chunk inside the call
        want = u[:, first - start:j + 1].sum(1)
        if first == start and carry is not None:
            want = want + carry
        torch.testing.assert_close(out[:, j], want, msg=f"s={s} start={start} j={j}")


@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize(("start", "n_prev"), [(0, 0), (4, None), (7, None)])
def test_stride_aware_mask_is_the_papers(s: int, start: int, n_prev: int | None) -> None:
    """Query i sees the chunks that ended at or before i (completed slots or chunk-end columns) and its own
    column (the running sum of its partial chunk); nothing else, and never an empty row."""
    n_prev = start // s if n_prev is None else n_prev
    T = 9
    mask = stride_aware_mask(start, T, n_prev, s, torch.device("cpu"))
    assert mask.shape == (T, n_prev + T) and mask.any(dim=1).all()
    for i in range(T):
        qi = start + i
        assert mask[i, :n_prev].all()
        for j in range(T):
            kj = start + j
            assert bool(mask[i, n_prev + j]) == (kj == qi or (kj < qi and (kj + 1) % s == 0)), (i, j)
    if s == 1:  # one token per chunk: plain causal attention
        assert torch.equal(mask[:, n_prev:], torch.ones(T, T, dtype=torch.bool).tril())


def trained_like(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter redrawn at a scale a trained model reaches (merge weights far from their neutral
    sigmoid(0), norms away from 1), so a wrong index or weight cannot hide behind an initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 1.0) + (p.dim() == 1))
    return module


def reference_stride_aware(mixer: TemporalLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """The previous training formulation, kept as the reference: the T running sums as keys under the
    [T, T] stride-aware mask, per-head K/V expanded, one masked SDPA."""
    from efficia.models.decoder import Step

    T = x.shape[1]
    rope = Step(0, T, x.device).rope(mixer.rope_dim, mixer.rope_theta)
    q_c, q_r = mixer.query(x, rope)
    c, k_r = mixer.kv(x, rope)
    c = mixer.merge.running_sums(c * mixer.merge.weights(c, 0), 0)
    mask = stride_aware_mask(0, T, 0, mixer.down_rate, x.device)
    return mixer.heads.attend(q_c, q_r, c, k_r, absorbed=False, mask=mask)


@pytest.mark.parametrize(("s", "T"), [(2, 16), (3, 17), (4, 5), (2, 1), (5, 3)])
def test_training_attention_equals_the_masked_formulation(s: int, T: int) -> None:
    """The fused training path (chunk-causal SDPA over slots + own running sum folded in) gives what the
    [T, T] stride-aware mask gave, on trained-like weights, for partial last chunks and T < s too."""
    from efficia.models.decoder import Step

    torch.manual_seed(s)
    mixer = trained_like(TemporalLatentAttention(16, 2, 12, 8, 4, 6, s, 10000.0, 0.0, 1e-6), seed=s)
    x = torch.randn(2, T, 16)
    rope = Step(0, T, x.device).rope(mixer.rope_dim, mixer.rope_theta)
    q_c, q_r = mixer.query(x, rope)
    c, k_r = mixer.kv(x, rope)
    c = mixer.merge.running_sums(c * mixer.merge.weights(c, 0), 0)
    got = stride_aware_attention(mixer.heads, q_c, q_r, c, k_r, s)
    torch.testing.assert_close(got, reference_stride_aware(mixer, x), atol=2e-5, rtol=2e-5)


def reference_training(mixer: TemporalLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """The previous training call, kept as the reference: `reference_stride_aware` (s=1: the expanded causal
    path) and the output projection, every intermediate kept for backward (no recomputation)."""
    if mixer.merge is not None:
        return mixer.out(reference_stride_aware(mixer, x))
    from efficia.models.decoder import Step

    rope = Step(0, x.shape[1], x.device).rope(mixer.rope_dim, mixer.rope_theta)
    return mixer.out(mixer.heads.attend(*mixer.query(x, rope), *mixer.kv(x, rope), absorbed=False, is_causal=True))


@pytest.mark.parametrize("s", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [1, 5, 16, 17])
def test_training_call_equals_the_previous_formulation(s: int, T: int) -> None:
    """The training call (projections and own values recomputed in backward) gives the masked formulation's
    output and gradients (x and every weight) on trained-like weights, for partial last chunks and T < s;
    cached calls over the same tokens (prefill, then chunks across chunk edges) give its output too."""
    from efficia.models.decoder import Step

    mixer = trained_like(TemporalLatentAttention(16, 2, 12, 8, 4, 6, s, 10000.0, 0.0, 1e-6), seed=s).double()
    x = torch.randn(2, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    assert_same_forward_and_grads(mixer, lambda xi: mixer(xi, Step(0, T, xi.device)),
                                  lambda xi: reference_training(mixer, xi), x)
    with torch.no_grad():
        want = reference_training(mixer, x)
    assert_cached_calls_equal(mixer, x, want)


def test_training_keeps_only_the_attention_tensors_for_backward() -> None:
    """Between forward and backward a training call keeps x and SDPA's tensors over the n = ceil(T/s) chunks
    (queries [B,H·s,n,·], sink + slots [B,H,n,·], output, log-sum-exp): no latent, running sum, per-head
    [B,H,T,·] key/value/query, own value or [B,T,H·Dv] copy, which the previous formulation kept."""
    from efficia.models.decoder import Step

    s, B, T = 3, 2, 40
    n = -(-T // s)
    mixer = trained_like(TemporalLatentAttention(16, 2, 12, 8, 4, 6, s, 10000.0, 0.0, 1e-6))
    x = torch.randn(B, T, 16, requires_grad=True)
    kept = saved_for_backward(mixer, x, Step(0, T, x.device))
    own = {t.untyped_storage().data_ptr() for t in (x, *mixer.parameters())}
    others = [tuple(t.shape) for t in kept
              if t.untyped_storage().data_ptr() not in own and not (t.dim() >= 3 and t.shape[2] == n)]
    assert not others, f"kept for backward besides x and the attention over {n} chunks: {others}"
    previous = saved_for_backward(reference_training, mixer, x)
    assert nbytes(kept) < nbytes(previous) / 2


@pytest.mark.parametrize("s", [2, 3, 4])
def test_cache_holds_ceil_t_over_s_slots(s: int) -> None:
    """After each token: ceil(T/s) slots of (kv_rank + rope_dim) numbers per layer, a slot appended exactly
    when a token starts a chunk, and cache_bytes the bytes held."""
    model = build_tiny("efficientlm", f"model.down_rate={s}").eval()
    cfg = model.blocks[0].mixer
    idx = torch.randint(TINY_VOCAB, (2, model.max_seq_len), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2)
    with torch.no_grad():
        for t in range(model.max_seq_len):
            before = cache.layers[0].latent.clone()
            model(idx[:, t:t + 1], cache=cache)
            n = math.ceil((t + 1) / s)
            for state in cache.layers:
                assert state.latent.shape == (2, n, cfg.rank) and state.rope_key.shape == (2, n, cfg.rope_dim)
            assert model.cache_bytes(t + 1) == model.n_layer * n * (cfg.rank + cfg.rope_dim) * 4
            if t % s:  # added into the last slot: the completed ones are untouched
                torch.testing.assert_close(cache.layers[0].latent[:, :-1], before[:, :-1], atol=0, rtol=0)
    assert model.cache_bytes(1200 * s) == 1200 * model.cache_bytes(1) == model.cache_bytes(1200 * s - s + 1)
    cache = model.new_cache(2)  # multi-token calls (a prompt, then chunks across chunk boundaries) keep the same
    with torch.no_grad():
        for a, b in ((0, 5), (5, 6), (6, 13), (13, model.max_seq_len)):
            model(idx[:, a:b], cache=cache)
            assert cache.layers[-1].latent.shape[1] == cache.layers[-1].rope_key.shape[1] == math.ceil(b / s)


def test_down_rate_one_is_optimus_mla_on_the_same_weights() -> None:
    """down_rate=1 (one token per slot) is exactly MLA: swap every mixer for optimus's MLA mixer holding the same
    weights and the logits match, in the full forward and in cached decoding."""
    model = build_tiny("efficientlm", "model.down_rate=1", "model.qk_nope_head_dim=16", "model.v_head_dim=16").eval()
    idx = torch.randint(TINY_VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        cache = model.new_cache(2)
        ours_cached = torch.cat([model(idx[:, :7], cache=cache), model(idx[:, 7:], cache=cache)], dim=1)
        for block in model.blocks:
            m = block.mixer
            mla = MultiHeadLatentAttention(model.d_model, m.heads.n_head, m.rank, None, m.rope_dim, m.rope_theta,
                                           0.0, "absorbed", m.kv.norm.eps)
            mla.load_state_dict(m.state_dict())  # strict: the very same parameters, nothing left over
            block.mixer = mla
        mla_logits = model(idx)
        cache = model.new_cache(2)
        mla_cached = torch.cat([model(idx[:, :7], cache=cache), model(idx[:, 7:], cache=cache)], dim=1)
    torch.testing.assert_close(ours, mla_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_cached, mla_cached, atol=1e-5, rtol=1e-5)


def test_temporal_compression_changes_the_model() -> None:
    """down_rate 2 on the same weights is not MLA: the merge really acts (so the test above is not vacuous)."""
    a = build_tiny("efficientlm", "model.down_rate=1").eval()
    b = build_tiny("efficientlm", "model.down_rate=2").eval()
    b.load_state_dict(a.state_dict(), strict=False)  # b has the hypernetworks on top
    idx = torch.randint(TINY_VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(a(idx)[:, 1:], b(idx)[:, 1:], atol=1e-4)


def test_positions_are_added_when_decoding_too() -> None:
    """Cached decoding reads the learned position of each token (the seed forgot them there)."""
    model = build_tiny("efficientlm").eval()
    idx = torch.randint(TINY_VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_cache(1)
        model(idx[:, :11], cache=cache)
        with_pos = model(idx[:, 11:], cache=cache)
        model.pos_emb.weight[11].add_(1.0)
        cache = model.new_cache(1)
        model(idx[:, :11], cache=cache)
        assert not torch.allclose(model(idx[:, 11:], cache=cache), with_pos)


# --- the external-embedding adapter ----------------------------------------------------------------


def test_adapter_starts_at_its_skip_and_adds_the_tokens_own_row() -> None:
    """`up` is zero at init; the external embedding of position t is the table row of token t (per token),
    and a changed row changes the logits from the token's first occurrence on, never before."""
    model = build_tiny("efficientlm", EXTERNAL).eval()
    assert torch.count_nonzero(model.adapter.up.weight) == 0 and torch.count_nonzero(model.adapter.skip.weight) > 0
    idx = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        before = model(idx)
        model.external_table[6].add_(1.0)  # token 6 sits at position 5
        after = model(idx)
    torch.testing.assert_close(before[:, :5], after[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_adapter_table_is_frozen_and_saved_with_the_weights() -> None:
    model = build_tiny("efficientlm", EXTERNAL)
    table = model.external_table.clone()
    assert "external_table" in model.state_dict()
    assert all(p is not model.external_table for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    for _ in range(2):
        model(idx).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(model.external_table, table)
    assert torch.count_nonzero(model.adapter.up.weight) > 0  # the adapter itself learns


def test_adapter_source_can_be_another_efficia_checkpoint(make_cfg, tmp_path) -> None:
    """A checkpoint written by train.py is a source: its token embeddings become the frozen table, and the
    checkpoint of the adapter run samples (the table travels inside it)."""
    import efficia
    from efficia.training.run import train
    from tests.conftest import require_data

    require_data()
    fast = ["debug=limit", "logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1"]
    first = train(make_cfg(*fast, "model=efficientlm"))
    ckpt = first["last_ckpt"]
    source_table = efficia.load(ckpt).net.tok_emb.weight
    second = train(compose_run([*fast, "model=efficientlm", f"model.external.source={ckpt}"], tmp_path / "second"))
    loaded = efficia.load(second["last_ckpt"])
    torch.testing.assert_close(loaded.net.external_table, source_table)
    assert len(loaded.generate("ROMEO:", max_new_tokens=5, seed=0)[0]) == 11


@pytest.mark.parametrize(("override", "message"), [
    ("model.external.source=/nonexistent/table.safetensors", "external embedding source .* does not exist"),
    ("model.down_rate=0", "down_rate must be >= 1, got 0"),
    ("model.rope_dim=3", "rope_dim must be even"),
])
def test_bad_settings_are_clear_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_tiny("efficientlm", override)


def test_external_table_of_another_vocabulary_is_a_clear_error(tmp_path) -> None:
    table = write_external_table(tmp_path / "other.safetensors", vocab_size=TINY_VOCAB + 1)
    with pytest.raises(ConfigError, match=r"has shape \(38, 12\), expected \[37, d\]"):
        build_tiny("efficientlm", f"model.external.source={table}")


def test_seed_sizes() -> None:
    """12 layers, 12 heads, 768 wide, block 1024, GPT-2 tokens: about 122M parameters (tied head)."""
    cfg = compose_run(["model=efficientlm", "scale=seed"], ROOT / "outputs" / "unused")
    with torch.device("meta"):
        model = build_model(OmegaConf.to_container(cfg.model, resolve=True), 50257)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model, cfg.model.max_seq_len) == (12, 12, 768, 1024)
    assert model.num_params() / 1e6 == pytest.approx(122, abs=1.0)


def test_seed_recipe(make_cfg) -> None:
    """experiment=efficientlm_seed: seed sizes, GPT-2 tokens, constant 3e-4, wd 0.1, betas 0.9/0.95, clip 1.0,
    bf16 autocast where bf16 runs (fp16 otherwise), whatever trainer preset is picked."""
    from efficia.training.module import warmup_cosine

    for trainer in ("cpu", "rtx3060"):
        cfg = make_cfg("experiment=efficientlm_seed", f"trainer={trainer}")
        assert (cfg.model.name, cfg.model.d_model, cfg.model.down_rate, cfg.tokenizer.encoding) == (
            "efficientlm", 768, 2, "gpt2")
        assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.optimizer.weight_decay) == (3e-4, [0.9, 0.95], 0.1)
        assert cfg.trainer.gradient_clip_val == 1.0
        want = "16-mixed" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16-mixed"
        assert cfg.trainer.precision == want
        lrs = {warmup_cosine(step, cfg.scheduler.warmup_steps, cfg.trainer.max_steps, cfg.scheduler.min_lr_ratio)
               for step in (0, 1, cfg.trainer.max_steps // 2, cfg.trainer.max_steps)}
        assert lrs == {1.0}


def test_mixed_precision_falls_back_to_fp16_without_bf16(monkeypatch) -> None:
    from efficia.config import mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert mixed_precision() == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert mixed_precision() == "bf16-mixed"
