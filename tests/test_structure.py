"""Code-structure contracts: bugs keep their traceback, models do no file I/O, exports are self-contained."""

from __future__ import annotations

import ast
import traceback
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import efficia
from efficia.checkpoint import LoadedModel
from efficia.data.tokenizers import CharTokenizer
from efficia.errors import ConfigError
from efficia.models.blocks import MLP
from efficia.training import train
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
