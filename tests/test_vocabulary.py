"""One config vocabulary: a key shared by model yamls means the same thing, in the same unit, in each of them.

Every check goes through config composition (`compose_run` + `build_model`, what `train.py` does), so the yamls,
the model_scale files and the constructors are tested together. docs/shared-keys.md is the table users read:
it must list exactly the shared keys and the models that have them.
"""

from __future__ import annotations

import re
import tempfile
from collections import defaultdict

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from efficia.build import build_model
from efficia.config import compose_run
from efficia.errors import ConfigError
from tests.conftest import CONF, ROOT, TINY_VOCAB

DOC = ROOT / "docs" / "shared-keys.md"


def model_keys() -> dict[str, set[str]]:
    """key -> the models whose conf/model yaml has it."""
    owners: dict[str, set[str]] = defaultdict(set)
    for path in sorted((CONF / "model").glob("*.yaml")):
        for key in yaml.safe_load(path.read_text()):
            owners[key].add(path.stem)
    return owners


SHARED = {key: models for key, models in model_keys().items() if len(models) > 1 and key != "name"}


def build(name: str, *overrides: str, seed: int = 0):
    cfg = compose_run([f"model={name}", "scale=tiny", *overrides], tempfile.gettempdir())
    torch.manual_seed(seed)
    return build_model(OmegaConf.to_container(cfg.model, resolve=True), TINY_VOCAB).eval()


def with_key(name: str) -> list[str]:
    """Overrides a model needs before a key means anything (optimus reads n_kv_head under gqa only)."""
    return ["model.attention=gqa"] if name == "optimus" else []


def test_docs_table_lists_exactly_the_shared_keys() -> None:
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| [^|]+ \| ([a-z, ]+) \|$", DOC.read_text(), flags=re.M)
    table = {key: set(models.replace(" ", "").split(",")) for key, models in rows}
    assert table == SHARED


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SHARED["ffn_hidden"]))
def test_ffn_hidden_is_the_feed_forward_width(name: str) -> None:
    """Every block's feed-forward has a layer `ffn_hidden` wide, and parameters grow linearly with it."""
    counts = []
    for hidden in (24, 40, 56):
        model = build(name, f"model.ffn_hidden={hidden}")
        for block in model.blocks:
            widths = {m.out_features for m in block.ffn.modules() if isinstance(m, nn.Linear)}
            assert hidden in widths, f"{name}: no {hidden}-wide layer in the feed-forward ({widths})"
        counts.append(param_count(model))
    assert counts[0] < counts[1] < counts[2] and counts[1] - counts[0] == counts[2] - counts[1]


@pytest.mark.parametrize("name", sorted(SHARED["tie_embeddings"]))
def test_tie_embeddings_shares_the_head_with_the_token_embedding(name: str) -> None:
    """true: the head is the embedding matrix (one V x d table fewer, trained as one); false: its own table."""
    tied, untied = build(name, "model.tie_embeddings=true"), build(name, "model.tie_embeddings=false")
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert param_count(untied) - param_count(tied) == untied.lm_head.weight.numel() == TINY_VOCAB * untied.d_model


@pytest.mark.parametrize("name", sorted(SHARED["n_kv_head"]))
def test_n_kv_head_sets_the_kv_heads_of_the_cache(name: str) -> None:
    """One K/V head instead of one per query head (tiny: 2) halves the cache and removes K/V parameters."""
    mha = build(name, *with_key(name), "model.n_kv_head=null")
    gqa = build(name, *with_key(name), "model.n_kv_head=1")
    assert gqa.cache_bytes(24) * 2 == mha.cache_bytes(24)
    assert param_count(gqa) < param_count(mha)


def test_n_kv_head_is_refused_where_it_would_be_ignored() -> None:
    with pytest.raises(ConfigError, match="n_kv_head=1 is read by attention=gqa only"):
        build("optimus", "model.n_kv_head=1")


@pytest.mark.parametrize("name", sorted(SHARED["attention_bias"]))
def test_attention_bias_reaches_the_attention_projections_only(name: str) -> None:
    """true: every block's mixer has linear layers with biases and its output projection is one of them; nothing
    outside the mixers has a bias. false: no linear layer has one."""
    for flag in (True, False):
        model = build(name, f"model.attention_bias={str(flag).lower()}")
        biased = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if n.endswith(".bias")}
        mixers = {f"blocks.{i}.mixer." for i in range(model.n_layer)}
        if not flag:
            assert not biased, f"{name}: {sorted(biased)}"
            continue
        assert {f"{m}proj" for m in mixers} <= biased, f"{name}: {sorted(biased)}"
        assert all(any(n.startswith(m) for m in mixers) for n in biased), f"{name}: {sorted(biased)}"
        assert all(any(n.startswith(m) for n in biased) for m in mixers)


def latent_slots(model, seq_len: int) -> int:
    return seq_len // getattr(model, "down_rate", 1)  # efficientlm merges `down_rate` positions per slot


@pytest.mark.parametrize("name", sorted(SHARED["kv_rank"]))
@pytest.mark.parametrize("kv_rank", [8, 12])
@pytest.mark.parametrize("rope_dim", [4, 6])
def test_kv_rank_and_rope_dim_are_the_latent_cache_widths(name: str, kv_rank: int, rope_dim: int) -> None:
    """A latent cache holds exactly kv_rank + rope_dim numbers per slot and layer, in both latent models."""
    model = build(name, f"model.kv_rank={kv_rank}", f"model.rope_dim={rope_dim}")
    seq_len = 12  # a whole number of efficientlm's tiny chunks (3)
    per_slot = model.cache_bytes(seq_len) / (model.n_layer * latent_slots(model, seq_len) * 4)  # fp32
    assert per_slot == kv_rank + rope_dim
    for block in model.blocks:
        assert (block.mixer.kv.d_c, block.mixer.kv.d_rope) == (kv_rank, rope_dim)
        assert block.mixer.query.d_rope == rope_dim  # each head's RoPE query part has the key's width


@pytest.mark.parametrize("name", sorted(SHARED["q_rank"]))
def test_q_rank_is_the_rank_of_the_query_projection(name: str) -> None:
    """The query goes through a d_model -> q_rank bottleneck; parameters grow linearly with q_rank."""
    counts = []
    for q_rank in (5, 7, 9):
        model = build(name, f"model.q_rank={q_rank}")
        d = model.d_model
        for block in model.blocks:
            bottleneck = [m for m in block.mixer.modules()
                          if isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (d, q_rank)]
            assert len(bottleneck) == 1, f"{name}: expected one {d} -> {q_rank} query projection"
        counts.append(param_count(model))
    assert counts[0] < counts[1] < counts[2] and counts[1] - counts[0] == counts[2] - counts[1]


def test_window_is_the_attention_band() -> None:
    """yinggem, one layer: the logits at position i change with token j iff 0 <= i - j < window."""
    window, T = 5, 16
    model = build("yinggem", f"model.window={window}", "model.n_layer=1")
    idx = torch.randint(0, TINY_VOCAB, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(idx)
        for j in range(T):
            changed = idx.clone()
            changed[0, j] = (idx[0, j] + 1) % TINY_VOCAB
            moved = (model(changed) - base).abs().amax(-1)[0] > 1e-6  # [T]
            expected = [0 <= i - j < window for i in range(T)]
            assert moved.tolist() == expected, f"token {j}"


def test_segment_is_efficias_segment_length() -> None:
    model = build("efficia", "model.segment=6")
    assert model.segment == 6
    assert all(block.mixer.window == 6 for block in model.blocks)  # the LCP band is the segment


@pytest.mark.parametrize(("name", "key"), [("efficia", "window"), ("lumenspark", "rank"),
                                           ("efficientlm", "kv_lora_rank"), ("efficientlm", "qk_rope_head_dim"),
                                           ("optimus", "compression_ratio"), ("gpt", "window"),
                                           ("yinggem", "bias"), ("lumenspark", "bias")])
def test_old_and_foreign_keys_are_refused(name: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"model={name}: unknown key\\(s\\) {key}"):
        build(name, f"+model.{key}=4")


@pytest.mark.parametrize("key", ["kv_rank", "q_rank", "rope_dim", "decode"])
def test_mla_keys_are_refused_under_gqa(key: str) -> None:
    value = "expanded" if key == "decode" else 8
    with pytest.raises(ConfigError, match=f"{key} are read by attention=mla only"):
        build("optimus", "model.attention=gqa", f"model.{key}={value}")


def test_switching_optimus_to_gqa_needs_one_override() -> None:
    model = build("optimus", "model.attention=gqa")
    assert model.blocks[0].mixer.n_kv_head == 2
