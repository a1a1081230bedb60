"""Export / import without pickle: every registered model round-trips through a pretrained folder
(config.json + tokenizer.json + model.safetensors) with identical logits; a real checkpoint exports
through the CLI and samples through sample.py; missing or corrupt files are one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import efficia
from efficia.data.tokenizers import CharTokenizer
from efficia.errors import CheckpointError
from efficia.inference import pretrained
from efficia.inference.export import main as export_main
from efficia.inference.loading import LoadedModel
from efficia.inference.sampling_cli import sample
from efficia.models import MODELS
from efficia.training.run import train
from tests.conftest import ROOT, TINY_VOCAB, build_tiny, require_data

CHARS = "".join(chr(c) for c in range(ord("a"), ord("a") + TINY_VOCAB))  # 37 distinct characters


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def tiny_loaded(name: str, make_cfg) -> LoadedModel:
    """A tiny `name` with every parameter moved off its init (so only loading can reproduce it)."""
    cfg = OmegaConf.to_container(make_cfg(f"model={name}", "scale=tiny"), resolve=True)
    net = build_tiny(name)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return LoadedModel(net.eval(), CharTokenizer(CHARS), cfg)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_generate_gives_identical_logits(name: str, make_cfg, tmp_path: Path) -> None:
    original = tiny_loaded(name, make_cfg)
    out = efficia.save_pretrained(original, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    torch.manual_seed(123)  # a different init than the saved model's
    loaded = efficia.from_pretrained(out)
    assert type(loaded) is LoadedModel and not loaded.net.training and loaded.tokenizer.chars == CHARS
    assert loaded.sampling == original.sampling and loaded.cfg["model"] == original.cfg["model"]
    idx = torch.randint(TINY_VOCAB, (2, original.net.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.net(idx), original.net(idx))
    for options in ({"temperature": 0}, {"temperature": 1.0, "top_k": 5}):
        assert loaded.generate("abc", seed=0, max_new_tokens=40, **options) == \
            original.generate("abc", seed=0, max_new_tokens=40, **options)


def test_a_bf16_model_is_exported_and_read_back_in_bf16(make_cfg, tmp_path: Path) -> None:
    """A bf16-true run's weights stay bf16 in the folder and in the model read back (and from its checkpoint)."""
    model = tiny_loaded("gpt", make_cfg)
    model.net.to(torch.bfloat16)
    out = efficia.save_pretrained(model, tmp_path / "export")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    loaded = efficia.from_pretrained(out)
    idx = torch.randint(TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert loaded.net.param_dtype == torch.bfloat16 and torch.equal(loaded.net(idx), model.net(idx))
    ckpt = tmp_path / "bf16.ckpt"
    torch.save({"hyper_parameters": {"cfg": model.cfg, "tokenizer_state": model.tokenizer.state()},
                "state_dict": {f"net.{k}": v for k, v in model.net.state_dict().items()}}, ckpt)
    assert efficia.load(ckpt).net.param_dtype == torch.bfloat16


def test_tied_weights_are_stored_once_and_stay_tied(make_cfg, tmp_path: Path) -> None:
    original = tiny_loaded("gpt", make_cfg)
    assert original.net.lm_head.weight is original.net.tok_emb.weight
    out = efficia.save_pretrained(original, tmp_path / "gpt")
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert len({"lm_head.weight", "tok_emb.weight"} & names) == 1
    loaded = efficia.from_pretrained(out).net
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    torch.testing.assert_close(loaded.lm_head.weight, original.net.lm_head.weight, rtol=0, atol=0)


def test_config_json_describes_model_tokenizer_and_sampling(make_cfg, tmp_path: Path) -> None:
    original = tiny_loaded("lumenspark", make_cfg)
    out = efficia.save_pretrained(original, tmp_path / "lumenspark")
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "efficia-pretrained" and config["vocab_size"] == TINY_VOCAB
    assert config["model"]["name"] == "lumenspark" and config["model"]["block"] == 8
    assert config["tokenizer"] == {"kind": "char"} and config["sampling"] == original.sampling
    assert json.loads((out / "tokenizer.json").read_text()) == {"kind": "char", "chars": CHARS}


def test_an_existing_folder_is_never_clobbered(make_cfg, tmp_path: Path) -> None:
    model = tiny_loaded("gpt", make_cfg)
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="not empty|not an efficia export"):
            efficia.save_pretrained(model, precious, overwrite=overwrite)
    assert (precious / "notes.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1
    out = efficia.save_pretrained(model, tmp_path / "export")
    with pytest.raises(CheckpointError, match="overwrite=true"):
        efficia.save_pretrained(model, out)
    efficia.save_pretrained(tiny_loaded("yinggem", make_cfg), out, overwrite=True)
    assert efficia.from_pretrained(out).cfg["model"]["name"] == "yinggem"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]  # no temporary folders left


def corrupt(folder: Path, how: str) -> None:
    weights, config = folder / "model.safetensors", folder / "config.json"
    if how == "no folder":
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    elif how.startswith("no "):
        (folder / how[3:]).unlink()
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage weights":
        weights.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    elif how == "bad json":
        config.write_text('{"format": "efficia-pretrained", ')
    elif how == "not an export":
        config.write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    elif how == "other sizes":
        cfg = json.loads(config.read_text())
        cfg["model"]["d_model"] = 64
        config.write_text(json.dumps(cfg))
    elif how == "bad tokenizer":
        (folder / "tokenizer.json").write_text(json.dumps({"kind": "sentencepiece"}))


@pytest.mark.parametrize(("how", "message"), [
    ("no folder", "is not a folder"),
    ("no config.json", "config.json is missing; export it again"),
    ("no model.safetensors", "model.safetensors is missing; export it again"),
    ("no tokenizer.json", "tokenizer.json is missing"),
    ("truncated weights", "model.safetensors is corrupt or does not fit model=gpt"),
    ("garbage weights", "model.safetensors is corrupt or does not fit model=gpt"),
    ("bad json", "config.json is not valid JSON"),
    ("not an export", "is not an efficia export config"),
    ("other sizes", "does not fit model=gpt as configured in config.json"),
    ("bad tokenizer", "unknown tokenizer state"),
])
def test_missing_or_corrupt_files_are_one_clear_error(make_cfg, tmp_path: Path, how: str, message: str) -> None:
    out = efficia.save_pretrained(tiny_loaded("gpt", make_cfg), tmp_path / "export")
    corrupt(out, how)
    with pytest.raises(CheckpointError, match=message):
        efficia.from_pretrained(out)


def test_export_cli_and_sample_from_the_folder(make_cfg, tmp_path: Path, capsys) -> None:
    """A real checkpoint -> `python -m efficia.export` -> the folder samples exactly as the checkpoint."""
    require_data()
    ckpt = train(make_cfg("debug=limit", "logger=csv", "model=lumenspark", "trainer.max_steps=4"))["last_ckpt"]
    out = tmp_path / "pretrained"
    assert export_main([f"ckpt={ckpt}", f"out={out}"]) == str(out.resolve())
    assert f"sample: python sample.py ckpt={out.resolve()}" in capsys.readouterr().out
    from_ckpt, from_dir = efficia.load(ckpt), efficia.from_pretrained(out)
    assert from_dir.cfg["model"] == from_ckpt.cfg["model"] and from_dir.sampling == from_ckpt.sampling
    texts = [sample(make_cfg(f"ckpt={src}", "prompt=ROMEO:", "max_new_tokens=20", "seed=0", config_name="sample"))
             for src in (ckpt, out)]
    assert texts[0] == texts[1] and len(texts[0][0]) == 26
    # the command line: a bad call is one line, exit 2
    proc = subprocess.run([sys.executable, "-m", "efficia.export", f"ckpt={tmp_path / 'nope.ckpt'}", f"out={out}2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "does not exist" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not Path(f"{out}2").exists()
    with pytest.raises(SystemExit):
        export_main([f"ckpt={ckpt}"])
    assert "missing out=; usage: python -m efficia.export" in capsys.readouterr().err
    # a folder nobody can write in (even root: /proc), in either format: one line, nothing written
    for out in ("/proc/efficia-export", "/proc/efficia-export/model"):
        for fmt in ("efficia", "hf"):
            with pytest.raises(SystemExit) as info:
                export_main([f"ckpt={ckpt}", f"out={out}", f"format={fmt}"])
            (line,) = capsys.readouterr().err.splitlines()
            assert info.value.code == 2 and line.startswith("error: cannot write in /proc"), line
            assert line.endswith("choose an out= in a folder you can write")


def test_an_export_to_a_mount_point_is_refused_before_writing(make_cfg) -> None:
    """A mount point cannot be replaced by a rename: refused before anything is written beside it."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and shm.is_mount() and not any(shm.iterdir())):
        pytest.skip("no empty mount point (/dev/shm) on this machine")
    before = set(shm.parent.iterdir())
    with pytest.raises(CheckpointError, match=r"out=/dev/shm is a mount point: .* \(out=/dev/shm/<name>\)"):
        efficia.save_pretrained(tiny_loaded("gpt", make_cfg), shm)
    assert set(shm.parent.iterdir()) == before and not any(shm.iterdir())


def test_a_failed_export_leaves_nothing_behind(make_cfg, tmp_path: Path, monkeypatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(pretrained, "save_model", disk_full)
    with pytest.raises(CheckpointError, match=r"cannot write the export to .*export \(No space left on device\)"):
        efficia.save_pretrained(tiny_loaded("gpt", make_cfg), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []
