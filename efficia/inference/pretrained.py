"""A trained model as a self-describing folder, for any registered architecture, without pickle:

    out_dir/
      config.json        {"format": "efficia-pretrained", "version": 1, "model": {name, sizes...},
                          "vocab_size": V, "tokenizer": {...run config...}, "sampling": {...preset...}}
      tokenizer.json     the tokenizer: {"kind": "char", "chars": "..."} or {"kind": "tiktoken", "encoding": "gpt2"}
      model.safetensors  the weights; a tensor shared by several names (a tied head) is stored once

`save_pretrained(..., format="hf")` writes a Hugging Face transformers folder instead (efficia/inference/hf), which
`from_pretrained` reads back too.

`save_pretrained(ckpt_or_model, out_dir)` writes it (`python -m efficia.export ckpt=... out=...` from a
shell), `from_pretrained(out_dir)` reads it back as the same `LoadedModel` that `efficia.load` gives,
and `sample.py ckpt=<out_dir>` samples from it. JSON and safetensors run no code when read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from efficia.build import build_model, weights_dtype
from efficia.checks import joined_lines
from efficia.data.tokenizers import tokenizer_from_state
from efficia.errors import CheckpointError, ConfigError, EfficiaError
from efficia.inference.hf import FORMAT as HF_FORMAT
from efficia.inference.hf import META as HF_META
from efficia.inference.hf import load_hf, write_hf
from efficia.inference.hf.foreign import load_transformers_folder, transformers_config
from efficia.inference.loading import LoadedModel, load

FORMAT, VERSION = "efficia-pretrained", 1
CONFIG, TOKENIZER, WEIGHTS = "config.json", "tokenizer.json", "model.safetensors"
HOW_TO_FIX = "export it again with `python -m efficia.export ckpt=<run>.ckpt out=<dir>`"
FORMATS = ("efficia", "hf")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def save_pretrained(source: str | Path | LoadedModel, out_dir: str | Path, overwrite: bool = False,
                    format: str = "efficia", remote_code: bool | None = None) -> Path:
    """Write `source` (a checkpoint path or a loaded model) to `out_dir`; returns the folder.

    `format="hf"`: a transformers folder (a native class where one computes the same math, else remote code;
    `remote_code=True` forces remote code, `False` refuses it). See efficia/inference/hf.

    The folder is written beside its destination and moved into place at the end, so an interrupted
    export never leaves a half-written one. An existing non-empty folder is replaced only with
    `overwrite=True`, and only if it is an efficia export itself (nothing else is ever deleted).
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r}: use efficia (efficia's own folder) or hf (Hugging Face transformers)")
    model = source if isinstance(source, LoadedModel) else load(source)
    run = OmegaConf.to_container(model.cfg, resolve=True) if isinstance(model.cfg, DictConfig) else model.cfg
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise CheckpointError(f"{out} already exists and is not empty; choose another out= or pass "
                                  "overwrite=true to replace an earlier export")
        if not is_export(out):
            raise CheckpointError(f"{out} exists and is not an efficia export; refusing to replace it. "
                                  "Choose another out=")
    if out.is_dir() and os.path.ismount(out):
        raise CheckpointError(f"out={out} is a mount point: an export is written beside its folder and moved into "
                              f"place, which a mount point cannot be; give a folder inside it (out={out}/<name>)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as err:
        raise CheckpointError(f"cannot write in {out.parent} ({err.strerror}); an export is written beside its "
                              "folder first: choose an out= in a folder you can write") from None
    try:
        if format == "hf":
            write_hf(model, run, tmp, remote_code)
        else:
            _write_efficia(model, run, tmp)
        replace(tmp, out)
    except OSError as err:
        raise CheckpointError(f"cannot write the export to {out} ({err.strerror or err}); nothing there was changed: "
                              "choose an out= in a folder you can write") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def replace(tmp: Path, out: Path) -> None:
    """Move the written folder into place; an earlier export there is put back if the move fails."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old)


def is_export(folder: Path) -> bool:
    """An efficia export of either format (only such a folder is ever replaced)."""
    for name, expected in ((CONFIG, FORMAT), (HF_META, HF_FORMAT)):
        if (folder / name).is_file():
            try:
                if json.loads((folder / name).read_text()).get("format") == expected:
                    return True
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                pass
    return False


def _write_efficia(model: LoadedModel, run: dict[str, Any], tmp: Path) -> None:
    config = {"format": FORMAT, "version": VERSION, "model": dict(run["model"]),
              "vocab_size": model.tokenizer.vocab_size,
              "tokenizer": {k: v for k, v in dict(run.get("tokenizer", {})).items() if k != "cache_dir"},
              "sampling": dict(model.sampling)}
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (tmp / TOKENIZER).write_text(json.dumps(model.tokenizer.state(), indent=2, ensure_ascii=False) + "\n")
    save_model(model.net, str(tmp / WEIGHTS), metadata={"format": "pt", "efficia_model": config["model"]["name"]})


def from_pretrained(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuild model, tokenizer and sampling preset from a folder written by `save_pretrained`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass the folder `python -m efficia.export` wrote")
    if (folder / HF_META).is_file():  # a transformers export (format=hf)
        return load_hf(folder, device)
    foreign = transformers_config(folder)
    if foreign is not None:  # a transformers folder efficia did not write (GPT-2)
        return load_transformers_folder(folder, foreign, default_sampling(), device)
    config = _read_json(folder, CONFIG)
    if config.get("format") != FORMAT or not all(isinstance(config.get(k), dict) for k in ("model", "sampling")):
        raise CheckpointError(f"{folder / CONFIG} is not an efficia export config (no format/model/sampling); "
                              f"{HOW_TO_FIX}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; {HOW_TO_FIX}")
    try:
        with safe_open(str(weights), "pt") as file:  # the header only: shapes of tensors a model takes as inputs
            shapes = {name: file.get_slice(name).get_shape() for name in file.keys()}  # noqa: SIM118
            dtype = weights_dtype(SAFETENSORS_DTYPES.get(file.get_slice(name).get_dtype(), torch.float32)
                                  for name in file.keys())  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise _not_loadable(weights, config, err) from None
    try:
        tokenizer = tokenizer_from_state(_read_json(folder, TOKENIZER))
        net = build_model(config["model"], tokenizer.vocab_size, shapes)  # self-contained: the weights hold the table
    except EfficiaError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    try:
        load_model(net, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        raise _not_loadable(weights, config, err) from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = {"model": config["model"], "tokenizer": config.get("tokenizer", {}), "sampling": config["sampling"]}
    try:
        return LoadedModel(net.to(device, dtype).eval(), tokenizer, cfg)
    except KeyError as err:
        raise CheckpointError(f"{folder / CONFIG}: the sampling preset lacks {err}; {HOW_TO_FIX}") from None


def default_sampling() -> dict[str, Any]:
    """conf/train.yaml's sampling preset, for a model that comes without one."""
    from efficia.config import train_defaults

    return train_defaults()["sampling"]


def load_any(path: str | Path, device: str = "cpu") -> LoadedModel:
    """A checkpoint file (`efficia.load`), an exported folder or a GPT-2 transformers folder (`from_pretrained`)."""
    return from_pretrained(path, device) if Path(path).expanduser().is_dir() else load(path, device)


def _not_loadable(weights: Path, config: dict[str, Any], err: Exception) -> CheckpointError:
    reason = joined_lines(err)
    return CheckpointError(f"{weights} is corrupt or does not fit model={config['model'].get('name')} "
                           f"as configured in {CONFIG} ({reason}); {HOW_TO_FIX}")


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    file = folder / name
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; {HOW_TO_FIX}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); {HOW_TO_FIX}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} should hold a JSON object; {HOW_TO_FIX}")
    return data
