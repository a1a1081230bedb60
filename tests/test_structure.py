"""Code-structure contracts: bugs keep their traceback, models do no file I/O, exports are self-contained."""

from __future__ import annotations

import ast
import traceback
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import efficia
from efficia.data.tokenizers import CharTokenizer
from efficia.errors import ConfigError
from efficia.inference.loading import LoadedModel
from efficia.models.layers import MLP
from efficia.training.run import train
from tests.conftest import ROOT, TINY_VOCAB, build_tiny, require_data, write_external_table

FAST = ["debug=fast_dev_run", "logger=csv", "callbacks.progress_bar=null"]
CHARS = "".join(chr(c) for c in range(ord("a"), ord("a") + TINY_VOCAB))


def test_a_bug_in_a_model_constructor_keeps_its_traceback(make_cfg, monkeypatch) -> None:
    """Not "fix the model.* overrides": a ZeroDivisionError deep in a constructor reaches the user as itself."""
    require_data()

    def broken_mlp_init(self, *args, **kwargs) -> None:
        return 1 // 0

    monkeypatch.setattr(MLP, "__init__", broken_mlp_init)
    with pytest.raises(ZeroDivisionError) as info:
        train(make_cfg(*FAST, "model=gpt"))
    assert "broken_mlp_init" in [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]


@pytest.mark.parametrize(("override", "line"), [
    ("model.n_head=x", "model=gpt: n_head must be a whole number, got 'x'; set model.n_head"),
    ("model.ffn_hidden=1.5", "model=gpt: ffn_hidden must be a whole number, got 1.5; set model.ffn_hidden"),
    ("model.ffn_hidden=-4", "model=gpt: ffn_hidden must be >= 1, got -4; set model.ffn_hidden"),
    ("model.rope_theta=abc", "model=gpt: rope_theta must be a number, got 'abc'; set model.rope_theta"),
    ("model.bias=3", "model=gpt: bias must be true or false, got 3; set model.bias"),
    ("model.d_model=null", "model=gpt: d_model must be set, got null; set model.d_model"),
])
def test_a_model_value_of_the_wrong_kind_is_one_line(make_cfg, override: str, line: str) -> None:
    require_data()
    with pytest.raises(ConfigError) as info:
        train(make_cfg(*FAST, "model=gpt", override))
    assert str(info.value) == line


def test_models_import_nothing_from_the_application() -> None:
    """efficia/models/ builds modules from values and tensors: it imports only itself and efficia.errors (no
    checkpoint reading, no import cycle through the app)."""
    for path in sorted((ROOT / "efficia" / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name == "efficia" or name.startswith("efficia."):
                    assert name.startswith("efficia.models") or name == "efficia.errors", f"{path.name}: {name}"
            assert not (isinstance(node, ast.Name) and node.id in ("open", "load_file", "read_checkpoint")), path.name


def test_contracts_are_declared_not_probed() -> None:
    """`registry_name` and `inputs` (LanguageModel) and `tokens_seen` (TrainingModule) are declared attributes,
    read as attributes: no getattr with a default that would hide a model or module lacking them."""
    from efficia.models import MODELS

    assert all(cls.registry_name == name and isinstance(cls.inputs, tuple) for name, cls in MODELS.items())
    probes = []
    for path in sorted((ROOT / "efficia").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in ("registry_name", "inputs", "tokens_seen")):
                probes.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not probes, f"declared attributes probed with getattr at {probes}: read them as attributes"


def test_one_model_factory() -> None:
    """Training, loading, export and the plan build models through efficia.build alone, so a model's outside
    inputs (efficientlm's table) reach every path: `construct(...)` is called only there, and a registered class
    (`MODELS[name](...)`) only inside the registry's `construct`. The remote-code wrapper is left out: it runs
    where efficia is not installed."""
    builders = set()
    for path in sorted((ROOT / "efficia").rglob("*.py")):
        if path.parent.name == "templates":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if (isinstance(func, ast.Name | ast.Attribute) and (getattr(func, "id", None) or func.attr) == "construct"
                    or isinstance(func, ast.Subscript) and ast.unparse(func.value).endswith("MODELS")):
                builders.add(str(path.relative_to(ROOT)))
    assert builders == {"efficia/build.py", "efficia/models/registry.py"}, f"models built in {sorted(builders)}"


def test_an_adapter_export_is_self_contained(make_cfg, tmp_path: Path) -> None:
    """Export an efficientlm with the external-embedding adapter, delete the table it was built from: the export
    (and a checkpoint) still load, with the same logits; the table travels in the weights."""
    table = write_external_table(tmp_path / "table.safetensors", seed=5)
    override = f"model.external.source={table}"
    cfg = OmegaConf.to_container(make_cfg("model=efficientlm", "scale=tiny", override), resolve=True)
    net = build_tiny("efficientlm", override)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    original = LoadedModel(net.eval(), CharTokenizer(CHARS), cfg)
    out = efficia.save_pretrained(original, tmp_path / "export")
    ckpt = tmp_path / "model.ckpt"
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg, "tokenizer_state": original.tokenizer.state()}},
               ckpt)
    table.unlink()
    idx = torch.randint(TINY_VOCAB, (2, net.max_seq_len), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # another init than the saved model's
    for loaded in (efficia.from_pretrained(out), efficia.load(ckpt)):
        assert loaded.net.adapter is not None
        with torch.no_grad():
            assert torch.equal(loaded.net(idx), original.net(idx))


RESIDUAL_CASES = [("efficia",), ("efficientlm",), ("gpt",), ("lumenspark",), ("optimus",),
                  ("optimus", "model.attention=gqa"), ("yinggem",)]


@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=" ".join)
def test_every_residual_projection_gets_the_scaled_init(case: tuple[str, ...]) -> None:
    """The layer whose output IS a block's mixer or feed-forward output (found by running the model, not by
    name or mark) starts at std 0.02/sqrt(2·n_layer), GPT-2's residual scaling; the other linears at 0.02."""
    from torch import nn

    from efficia.models import MODELS

    n_layer = 8
    name, *overrides = case
    model = build_tiny(name, f"model.n_layer={n_layer}", *overrides).eval()
    assert set(MODELS) == {c[0] for c in RESIDUAL_CASES}
    produced: dict[str, torch.Tensor] = {}
    branches: list[torch.Tensor] = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda _m, _i, out, key=module_name: produced.setdefault(key, out))
    for block in model.blocks:
        for branch in (block.mixer, block.ffn):
            branch.register_forward_hook(lambda _m, _i, out: branches.append(out))
    with torch.no_grad():
        model(torch.randint(TINY_VOCAB, (1, 16), generator=torch.Generator().manual_seed(0)))
    residual = {key for out in branches for key, value in produced.items() if value is out}
    assert len(residual) == 2 * n_layer, f"{name}: found {sorted(residual)}"
    expected = 0.02 / (2 * n_layer) ** 0.5
    for key, module in model.named_modules():
        if key in residual:
            assert 0.75 < module.weight.std().item() / expected < 1.25, f"{name}: {key} is not scaled"


@pytest.mark.parametrize("latent_norm", ["rmsnorm", "layernorm"])
def test_mtla_latent_norm_is_a_choice_and_both_keep_the_contract(latent_norm: str) -> None:
    """efficientlm with RMSNorm (ours) or the MTLA authors' LayerNorm with bias: the norm is what was asked,
    future tokens never change past logits, and a cached run (prefill, then odd chunks across the merge stride)
    equals the full forward, on randomised weights (a LayerNorm bias away from zero)."""
    from torch import nn

    from efficia.models.layers import RMSNorm

    model = build_tiny("efficientlm", f"model.latent_norm={latent_norm}", seed=3).eval()
    norm = model.blocks[0].mixer.kv.norm
    if latent_norm == "layernorm":
        assert type(norm) is nn.LayerNorm and norm.bias is not None
    else:
        assert type(norm) is RMSNorm
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    T = model.max_seq_len
    idx = torch.randint(TINY_VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        changed = idx.clone()
        changed[:, 20:] = (changed[:, 20:] + 1) % TINY_VOCAB
        torch.testing.assert_close(model(changed)[:, :20], full[:, :20])
        cache = model.new_cache(2)
        cuts = [0, 7, 8, 9, 13, 20, T]
        parts = [model(idx[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_the_authors_latent_norm_trains(make_cfg) -> None:
    require_data()
    result = train(make_cfg(*FAST, "model=efficientlm", "model.latent_norm=layernorm"))
    assert result["metrics"]["val/loss"] > 0


def test_an_unknown_latent_norm_is_one_line(make_cfg) -> None:
    with pytest.raises(ConfigError, match="latent_norm must be 'rmsnorm' or 'layernorm', got 'batchnorm'"):
        build_tiny("efficientlm", "model.latent_norm=batchnorm")
