"""Export to Hugging Face transformers (inference/hf): every registered model and flag variant (tests/test_models.py's
VARIANTS) is exported at tiny scale with trained-like weights and loaded by transformers in a separate process
where efficia cannot be imported; its logits equal ours within 1e-4 (fp32) and its greedy generate() of 32 tokens
is ours token for token. Native folders (optimus, gpt) need no remote code; the rest carry efficia's own source.
Tokenizers round-trip through AutoTokenizer; folders import back; a table that misses a tensor is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import efficia
from efficia.build import build_model
from efficia.config import compose_run
from efficia.data.tokenizers import ByteTokenizer, CharTokenizer, TiktokenTokenizer
from efficia.errors import CheckpointError, ConfigError
from efficia.inference.export import main as export_main
from efficia.inference.generate import generate
from efficia.inference.hf import native, remote_code
from efficia.inference.loading import LoadedModel
from efficia.models import MODELS
from efficia.training.run import train
from tests.conftest import ROOT, TINY_VOCAB, build_tiny, require_data
from tests.test_models import VARIANTS
from tests.trained_like import randomise

transformers = pytest.importorskip("transformers", reason="format=hf needs the [hf] extra: pip install -e '.[hf]'")

CHARS = "".join(chr(c) for c in range(ord("a"), ord("a") + TINY_VOCAB))
LONG = "model.max_seq_len=64"  # 8 prompt + 32 new tokens stay inside every bounded context
NATIVE = {"optimus": "DeepseekV2ForCausalLM", "optimus[model.decode=expanded]": "DeepseekV2ForCausalLM",
          "optimus[model.attention=gqa]": "LlamaForCausalLM",
          "optimus[model.attention=gqa model.n_kv_head=1]": "LlamaForCausalLM", "gpt": "Starcoder2ForCausalLM",
          "gpt[model.n_kv_head=1]": "Starcoder2ForCausalLM", "gpt[model.pos_emb=learned]": "GPT2LMHeadModel",
          "gpt[model.dropout=0.2 model.n_kv_head=1]": "Starcoder2ForCausalLM",
          "gpt[model.bias=true]": "Starcoder2ForCausalLM",
          "gpt[model.bias=true model.pos_emb=learned]": "GPT2LMHeadModel",
          "gpt[model.tie_embeddings=false]": "Starcoder2ForCausalLM",
          "optimus[model.tie_embeddings=false]": "DeepseekV2ForCausalLM",
          "optimus[model.attention=gqa model.tie_embeddings=false]": "LlamaForCausalLM",
          "optimus[model.attention=gqa model.norm_eps=1e-5]": "LlamaForCausalLM",
          "gpt[bf16]": "Starcoder2ForCausalLM"}
EXTRA = {"gpt": [("model.bias=true",), ("model.bias=true", "model.pos_emb=learned")]}
CASES = [(name, v) for name in sorted(MODELS) for v in [*VARIANTS.get(name, [()]), *EXTRA.get(name, [])]]
REMOTE_ANYWAY = "optimus[remote_code]"  # the remote-code path on a model that also has a native class
BF16 = "gpt[bf16]"  # a bf16 model (a bf16-true run): the folder keeps bf16, and so does reading it back
# untied heads, and a norm epsilon that is not transformers' default (an export that dropped it from the config
# would pass with the default one); after the cases above, whose random inputs are seeded by their position
CASES += [("gpt", ("model.tie_embeddings=false",)), ("optimus", ("model.tie_embeddings=false",)),
          ("optimus", ("model.attention=gqa", "model.tie_embeddings=false")),
          ("optimus", ("model.attention=gqa", "model.norm_eps=1e-5"))]
CASE_IDS = [name + (f"[{' '.join(v)}]" if v else "") for name, v in CASES]
SPECIAL = {REMOTE_ANYWAY: ("optimus", ()), BF16: ("gpt", ())}
ORDER = len(CASES) - 4  # REMOTE_ANYWAY first exported there, before the four above

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_like(name: str, variant: tuple[str, ...], seed: int = 0) -> LoadedModel:
    """Tiny `name` with trained-like weights (gates and merges far from neutral, peaked logits: no near-ties)."""
    cfg = OmegaConf.to_container(compose_run([f"model={name}", "scale=tiny", *variant, LONG], "/tmp"), resolve=True)
    torch.manual_seed(seed)
    net = randomise(build_model(cfg["model"], TINY_VOCAB), seed)
    return LoadedModel(net.eval(), CharTokenizer(CHARS), cfg)


# The subprocess: efficia is refused on import (even where it is pip-installed), cwd is a bare folder, and every
# exported folder is loaded with the Auto classes, run on the same inputs, and asked for 32 greedy tokens.
LOADER = textwrap.dedent("""
    import importlib.abc, json, sys, torch

    class NoEfficia(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "efficia" or name.startswith("efficia."):
                raise ImportError(f"efficia must not be needed: something imported {name}")

    sys.meta_path.insert(0, NoEfficia())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    jobs = json.loads(open(sys.argv[1]).read())
    results = {}
    for case, job in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(job["folder"], trust_remote_code=job["remote"]).eval()
        tokenizer = AutoTokenizer.from_pretrained(job["folder"], trust_remote_code=job["remote"])
        idx = torch.tensor(job["idx"])
        with torch.no_grad():
            logits = model(input_ids=idx).logits
        out = model.generate(idx[:1, :8], max_new_tokens=32, do_sample=False)
        results[case] = {"class": type(model).__name__, "logits": logits, "generated": out[0, 8:],
                         "dtype": str(next(model.parameters()).dtype),
                         "ids": tokenizer(job["text"])["input_ids"], "text": tokenizer.decode(job["ids"])}
    torch.save(results, sys.argv[2])
""")


# The tests of `exported` share one worker under `pytest -n` (--dist loadgroup): the fixture, and its transformers
# process, then runs once rather than once per worker.
EXPORTED = pytest.mark.xdist_group("hf-exported")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict]:
    """Every case exported (in this process) and loaded by transformers (in one clean subprocess)."""
    root = tmp_path_factory.mktemp("hf")
    cases, jobs = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors (a module fixture runs before the per-test one_thread)
    jobs_in_order = [*zip(CASES, CASE_IDS, strict=True)]
    jobs_in_order[ORDER:ORDER] = [(v, k) for k, v in SPECIAL.items()]
    for (name, variant), case in jobs_in_order:
        model = trained_like(name, variant)
        if case == BF16:  # seed 0: its bf16 logits are 0.024 of their scale from fp32's (a bf16 vs fp32 check fails)
            model.net.to(torch.bfloat16)
        folder = efficia.save_pretrained(model, root / f"export-{len(cases)}", format="hf",
                                         remote_code=True if case == REMOTE_ANYWAY else None)
        idx = torch.randint(TINY_VOCAB, (2, 40), generator=torch.Generator().manual_seed(len(cases)))
        with torch.no_grad():
            logits = model.net(idx)
        ours = generate(model.net, idx[:1, :8], 32, temperature=0.0)[0, 8:]
        text = "thequickbrownfox"
        cases[case] = {"model": model, "folder": folder, "idx": idx, "logits": logits, "generated": ours,
                       "ids": model.tokenizer.encode(text), "text": text}
        meta = json.loads((folder / "efficia.json").read_text())["transformers"]
        jobs[case] = {"folder": str(folder), "remote": meta["remote_code"], "idx": idx.tolist(), "text": text,
                      "ids": model.tokenizer.encode(text)}
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "run").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", LOADER, str(root / "jobs.json"), str(root / "results.pt")],
                          cwd=root / "run", env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(threads)
    results = torch.load(root / "results.pt", weights_only=False)
    for case, theirs in results.items():
        cases[case]["theirs"] = theirs
    return cases


@EXPORTED
@pytest.mark.parametrize("case", [*CASE_IDS, *SPECIAL])
def test_transformers_computes_what_efficia_computes(exported, case: str) -> None:
    got = exported[case]
    theirs = got["theirs"]
    assert theirs["class"] == NATIVE.get(case, "EfficiaForCausalLM")
    assert theirs["dtype"] == str(got["logits"].dtype)  # the folder's dtype, transformers' dtype="auto"
    if case == BF16:  # two bf16 forwards, different kernels: within bf16's rounding, not fp32's 1e-4
        scale = got["logits"].float().abs().max().item()
        torch.testing.assert_close(theirs["logits"].float(), got["logits"].float(), atol=0.05 * scale, rtol=0)
        return
    torch.testing.assert_close(theirs["logits"], got["logits"], atol=1e-4, rtol=0, msg=f"{case}: logits differ")
    assert theirs["generated"].tolist() == got["generated"].tolist(), f"{case}: greedy generate() differs"
    assert theirs["ids"] == got["ids"] and theirs["text"] == got["text"]


@EXPORTED
@pytest.mark.parametrize("case", [*CASE_IDS, *SPECIAL])
def test_an_exported_folder_imports_back_as_the_same_model(exported, case: str) -> None:
    got = exported[case]
    loaded = efficia.from_pretrained(got["folder"])
    assert loaded.net.param_dtype == got["model"].net.param_dtype
    assert loaded.cfg["model"] == got["model"].cfg["model"] and loaded.sampling == got["model"].sampling
    assert loaded.tokenizer.state() == got["model"].tokenizer.state()
    with torch.no_grad():
        assert torch.equal(loaded.net(got["idx"]), got["logits"])


@EXPORTED
def test_native_folders_carry_no_code_and_remote_folders_carry_efficias(exported) -> None:
    for case, got in exported.items():
        files = {p.name for p in got["folder"].iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "efficia.json"} <= files
        config = json.loads((got["folder"] / "config.json").read_text())
        if case in NATIVE:
            assert not any(f.endswith(".py") for f in files) and "auto_map" not in config, case
        else:
            assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_efficia.EfficiaForCausalLM", case
            assert {"modeling_efficia.py", "configuration_efficia.py", "decoder.py", "construction.py", "layers.py",
                    "kernels.py"} <= files, case


@pytest.mark.parametrize("name", sorted(MODELS))
def test_remote_code_is_efficias_source_with_only_its_imports_rewritten(name: str) -> None:
    """The bundle is generated from the model's own modules: no line but an import may differ from efficia's."""
    files = remote_code.remote_files(build_tiny(name))
    module = MODELS[name].__module__.rsplit(".", 1)[-1]
    assert f"from .{module} import {MODELS[name].__name__}" in files[remote_code.MODELING]
    sources = {Path(m.__file__).name: Path(m.__file__) for m in map(sys.modules.get, list(sys.modules))
               if m is not None and (m.__name__.startswith("efficia.models.") or m.__name__ == "efficia.errors")}
    for file_name, bundled in files.items():
        if file_name in (remote_code.MODELING, remote_code.CONFIGURATION):
            continue
        original = sources[file_name].read_text().splitlines()
        assert len(bundled.splitlines()) == len(original), file_name
        for ours, theirs in zip(original, bundled.splitlines(), strict=True):
            assert ours == theirs or (ours.lstrip().startswith("from efficia.") and theirs.lstrip().startswith(
                "from .")), f"{file_name}: {ours!r} became {theirs!r}"
        assert "efficia" not in " ".join(remote_code.efficia_imports(bundled))


@pytest.mark.parametrize("kind", ["char", "byte", "gpt2"])
def test_tokenizers_round_trip_through_autotokenizer(kind: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from efficia.inference.hf.tokenizer import hf_tokenizer

    require_data()
    data = Path(os.environ["EFFICIA_DATA_DIR"])
    text = (data / "tinyshakespeare" / "input.txt").read_text()[:20000]
    ours = {"char": lambda: CharTokenizer.from_text(text), "byte": ByteTokenizer,
            "gpt2": lambda: TiktokenTokenizer("gpt2")}[kind]()
    hf_tokenizer(ours).save_pretrained(str(tmp_path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    samples = [text]
    if kind != "char":
        import pandas as pd

        wiki = pd.read_parquet(data / "wikipedia-sample" / "sample-00000-of-00002.parquet").text
        samples += ["\n".join(wiki[:3]), "héllo wörld 🌍  \n\n  tabs\tand   spaces  ", " leading", "ends "]
    for sample in samples:
        ids = ours.encode(sample)
        assert theirs(sample)["input_ids"] == ids
        assert theirs.decode(ids) == ours.decode(ids) == sample
    assert len(theirs) == ours.vocab_size and theirs.eos_token_id == ours.eot


def test_a_table_that_misses_a_tensor_fails_in_one_line(monkeypatch, tmp_path: Path) -> None:
    model = trained_like("optimus", ())
    rules = tuple(r for r in native.DEEPSEEK_V2.rules if not r.theirs[0].endswith("kv_b_proj.weight"))
    monkeypatch.setattr(native, "NATIVE", {"optimus": (native.Native("DeepseekV2ForCausalLM", native.deepseek_v2,
                                                                      rules),)})
    with pytest.raises(CheckpointError) as err:
        efficia.save_pretrained(model, tmp_path / "out", format="hf")
    message = str(err.value)
    assert "\n" not in message and "no rule takes efficia's tensor blocks.0.mixer.heads.uk.weight" in message
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_wrong_permutation_is_caught_before_anything_is_written(monkeypatch, tmp_path: Path) -> None:
    """The export checks transformers' logits against ours: DeepSeek's RoPE pairing left unpermuted fails."""
    monkeypatch.setitem(native.ROWS, "mla_kv_a", lambda c: torch.arange(c.kv_lora_rank + c.qk_rope_head_dim))
    with pytest.raises(CheckpointError, match="logits differ from efficia's"):
        efficia.save_pretrained(trained_like("optimus", ()), tmp_path / "out", format="hf")
    assert list(tmp_path.iterdir()) == []


def copy_folder(source: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in source.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@EXPORTED
def test_a_folder_missing_a_tensor_fails_in_one_line(exported, tmp_path: Path) -> None:
    """The folder is what is wrong (a tensor gone, or an efficia.json that describes other weights): the line says
    so and says to export again; it does not blame efficia's mapping table."""
    from safetensors.torch import load_file, save_file

    for case in ("optimus", "yinggem"):
        folder = copy_folder(exported[case]["folder"], tmp_path / case)
        tensors = load_file(str(folder / "model.safetensors"))
        dropped = sorted(tensors)[3]
        del tensors[dropped]
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError) as err:
            efficia.from_pretrained(folder)
        message = str(err.value)
        assert "\n" not in message and "tensor" in message and message.endswith("export the model again"), message
        assert "mapping table" not in message, message
    folder = copy_folder(exported["optimus"]["folder"], tmp_path / "fewer-layers")
    meta = json.loads((folder / "efficia.json").read_text())
    meta["model"]["n_layer"] -= 1
    (folder / "efficia.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"import from DeepseekV2ForCausalLM: the folder's tensor "
                                              r"model\.layers\.1\..* has no place in the model its efficia\.json "
                                              r"describes \(1 layers\) .*; export the model again$"):
        efficia.from_pretrained(folder)


@EXPORTED
def test_a_nonzero_tensor_efficia_has_no_place_for_is_refused(exported, tmp_path: Path) -> None:
    """A transformers folder with a tensor our model lacks (gpt has bias-free norms, Starcoder2 has norm biases):
    zero, it imports (what efficia writes); nonzero, dropping it would change the model, so one line refuses."""
    from safetensors.torch import load_file, save_file

    folder = copy_folder(exported["gpt"]["folder"], tmp_path / "gpt")
    tensors = load_file(str(folder / "model.safetensors"))
    assert not tensors["model.norm.bias"].any()
    efficia.from_pretrained(folder)
    tensors["model.norm.bias"] = torch.full_like(tensors["model.norm.bias"], 0.1)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"import from Starcoder2ForCausalLM: model\.norm\.bias is not zero, "
                                              r"and efficia's model has no such tensor"):
        efficia.from_pretrained(folder)


def test_an_export_made_before_efficias_split_loads(tmp_path: Path) -> None:
    """An efficia export whose tensors carry the names from before the mixer was split into stages (docs/CHANGELOG.md)
    imports back through the renaming checkpoints get (`RENAMED`), to the same logits."""
    from safetensors.torch import load_file, save_file

    from efficia.models.efficia import RENAMED

    model = trained_like("efficia", ())
    folder = efficia.save_pretrained(model, tmp_path / "export", format="hf")
    previous = {new: old for old, new in RENAMED.items()}
    tensors = {}
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        head, mixer, local = name.partition(".mixer.")
        tensors[head + mixer + previous.get(local, local) if mixer else name] = tensor
    assert sum(name.partition(".mixer.")[2] in RENAMED for name in tensors) == len(RENAMED) * model.net.n_layer
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    idx = torch.randint(TINY_VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(efficia.from_pretrained(folder).net(idx), model.net(idx))


def test_remote_code_false_refuses_a_model_without_a_native_class(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no native transformers class computes this yinggem"):
        efficia.save_pretrained(trained_like("yinggem", ()), tmp_path / "out", format="hf", remote_code=False)
    with pytest.raises(ConfigError, match="format='onnx'"):
        efficia.save_pretrained(trained_like("yinggem", ()), tmp_path / "out", format="onnx")


def test_export_cli_writes_a_transformers_folder(make_cfg, tmp_path: Path, capsys) -> None:
    """A real checkpoint -> `python -m efficia.export ... format=hf` -> transformers samples what efficia samples."""
    require_data()
    run = make_cfg("debug=limit", "logger=csv", "model=optimus", "scale=tiny", "trainer.max_steps=2")
    ckpt = train(run)["last_ckpt"]
    out = tmp_path / "hf"
    assert export_main([f"ckpt={ckpt}", f"out={out}", "format=hf"]) == str(out.resolve())
    printed = capsys.readouterr().out
    assert "as transformers' DeepseekV2ForCausalLM" in printed and "AutoTokenizer.from_pretrained" in printed
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = efficia.load(ckpt)
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == ours.tokenizer.encode("ROMEO:")
    theirs = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0])
    assert theirs == ours.generate("ROMEO:", max_new_tokens=12, temperature=0)[0]
    proc = subprocess.run([sys.executable, "-m", "efficia.export", f"ckpt={ckpt}", f"out={out}2", "format=hf",
                           "remote_code=maybe"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "remote_code='maybe'" in errors[0], proc.stderr[-2000:]


def test_without_transformers_format_hf_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ConfigError, match=r"format=hf needs transformers .*pip install 'efficia\[hf\]'"):
        efficia.save_pretrained(trained_like("gpt", ()), tmp_path / "out", format="hf")
    assert list(tmp_path.iterdir()) == []
