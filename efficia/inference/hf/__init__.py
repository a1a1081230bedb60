"""Export to Hugging Face transformers (`save_pretrained(..., format="hf")`, `python -m efficia.export ... format=hf`)
and import back (`efficia.from_pretrained(folder)`).

    folder/
      config.json, model.safetensors     a native transformers class where one computes the same math
                                         (hf/native.py), else remote code (hf/remote_code.py):
      configuration_efficia.py, ...      + the bundled efficia source and auto_map (trust_remote_code=True)
      tokenizer.json, tokenizer_config.json   AutoTokenizer gives the same ids (efficia/inference/hf/tokenizer.py)
      generation_config.json             the checkpoint's sampling preset
      efficia.json                       what efficia needs to read the folder back: model config, tokenizer
                                         state, sampling preset, which transformers class was written and why

A native export is checked before it is written: transformers' logits must equal efficia's on a random input.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efficia.errors import CheckpointError, ConfigError

META, FORMAT, VERSION = "efficia.json", "efficia-hf", 1
WEIGHTS = "model.safetensors"
REMOTE_CLASS = "EfficiaForCausalLM"


def require_transformers() -> None:
    """format=hf needs the [hf] extra: one line saying so, not an ImportError from deep inside."""
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"format=hf needs transformers and tokenizers ({err}); pip install 'efficia[hf]' "
                          "(or pip install -e '.[hf]' in a clone)") from None


def write_hf(model: Any, run: dict[str, Any], folder: Path, remote_code: bool | None = None) -> str:
    """Write `model` (a LoadedModel) into the empty `folder`; returns which transformers class and why."""
    require_transformers()
    from efficia.inference.hf.native import choose
    from efficia.inference.hf.tokenizer import hf_tokenizer

    net = model.net
    native, why = (None, "remote_code=true") if remote_code else choose(net)
    if native is None and remote_code is False:
        raise ConfigError(f"no native transformers class computes this {net.registry_name} ({why}); "
                          "drop remote_code=false to export it as remote code")
    eos = model.tokenizer.eot
    if native is not None:
        _write_native(net, native, folder, eos)
        written = f"{native.hf_class} (native transformers class)"
    else:
        _write_remote(net, dict(run["model"]), folder, eos)
        written = f"{REMOTE_CLASS} (remote code: {why})"
    hf_tokenizer(model.tokenizer).save_pretrained(str(folder))
    _generation_config(model.sampling).save_pretrained(str(folder))
    meta = {"format": FORMAT, "version": VERSION, "model": dict(run["model"]),
            "vocab_size": model.tokenizer.vocab_size, "tokenizer_state": model.tokenizer.state(),
            "tokenizer": {k: v for k, v in dict(run.get("tokenizer", {})).items() if k != "cache_dir"},
            "sampling": dict(model.sampling),
            "transformers": {"class": native.hf_class if native else REMOTE_CLASS, "remote_code": native is None,
                             "why": why}}
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")
    return written


def _generation_config(sampling: dict[str, Any]) -> Any:
    """The sampling preset as transformers' GenerationConfig. Like efficia's sampler it does not stop at an
    end-of-text token (pass eos_token_id= to generate() for that)."""
    from transformers import GenerationConfig

    temperature = float(sampling["temperature"])
    return GenerationConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                            top_k=sampling.get("top_k") or 0, top_p=sampling.get("top_p") or 1.0,
                            repetition_penalty=float(sampling.get("repetition_penalty") or 1.0),
                            max_new_tokens=sampling.get("max_new_tokens"))


def _write_native(net: nn.Module, native: Any, folder: Path, eos: int | None) -> None:
    import transformers

    from efficia.inference.hf.native import convert, unique_tensors

    config = transformers.AutoConfig.for_model(**native.config(net), bos_token_id=None, eos_token_id=eos,
                                               pad_token_id=None)
    hf = getattr(transformers, native.hf_class)(config).eval()
    ours, _ = unique_tensors(net)
    theirs, aliases = unique_tensors(hf)
    tensors = convert(native, config, {k: v.detach().cpu() for k, v in ours.items()}, theirs, net.n_layer, to_hf=True)
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - set(aliases):
        raise CheckpointError(f"export to {native.hf_class}: {(unexpected or sorted(set(missing) - set(aliases)))[0]} "
                              "does not fit its state dict")
    # like with like: both models in fp32 with the same weights (a bf16 model's are exact in fp32), so the check
    # sees the mapping, not two dtypes' rounding; then the folder is written in the checkpoint's dtype
    ours_fp32 = net if net.param_dtype == torch.float32 else copy.deepcopy(net).float()
    check_logits(ours_fp32, lambda idx: hf(input_ids=idx).logits, native.hf_class)
    hf.to(net.param_dtype)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # one small folder: no "Writing model shards" bar
    try:
        hf.save_pretrained(str(folder))
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _write_remote(net: nn.Module, model_cfg: dict[str, Any], folder: Path, eos: int | None) -> None:
    import transformers
    from safetensors.torch import save_file

    from efficia.inference.hf.native import tied, unique_tensors
    from efficia.inference.hf.remote_code import CONFIGURATION, MODELING, remote_files

    for name, source in remote_files(net).items():
        (folder / name).write_text(source)
    config = {"architectures": [REMOTE_CLASS], "model_type": "efficia",
              "auto_map": {"AutoConfig": f"{CONFIGURATION[:-3]}.EfficiaConfig",
                           "AutoModelForCausalLM": f"{MODELING[:-3]}.{REMOTE_CLASS}"},
              "efficia_model": model_cfg, "vocab_size": net.tok_emb.num_embeddings, "tie_word_embeddings": tied(net),
              "efficia_inputs": {name: list(getattr(net, name).shape) for name in net.inputs
                                 if getattr(net, name, None) is not None},
              "bos_token_id": None, "eos_token_id": eos, "pad_token_id": None,
              "dtype": str(net.param_dtype).removeprefix("torch."), "transformers_version": transformers.__version__}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors, _ = unique_tensors(net)
    save_file({f"model.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS),
              metadata={"format": "pt"})


def check_logits(net: nn.Module, theirs: Any, what: str) -> None:
    """transformers' logits must equal efficia's on a random input: within 1e-4 of the logits' scale, both in fp32
    (a looser bound, from the dtype, only for a model that is not)."""
    length = min(16, net.max_seq_len)
    idx = torch.randint(net.tok_emb.num_embeddings, (1, length), generator=torch.Generator().manual_seed(0))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            a = net(idx.to(net.device)).float().cpu()
            b = theirs(idx).float().cpu()
    finally:
        net.train(was_training)
    tolerance = 1e-4 if net.param_dtype == torch.float32 else 2e-2
    diff = (a - b).abs().max().item()
    if not diff <= tolerance * max(1.0, a.abs().max().item()):
        raise CheckpointError(f"export to {what}: its logits differ from efficia's by {diff:.3g}; this is a bug in "
                              "efficia/inference/hf (please report it with the model config)")


def load_hf(folder: Path, device: str = "cpu") -> Any:
    """The LoadedModel of a folder `write_hf` wrote (native or remote code), without running its code."""
    from efficia.build import build_model, weights_dtype
    from efficia.data.tokenizers import tokenizer_from_state
    from efficia.errors import EfficiaError
    from efficia.inference.loading import LoadedModel

    meta = _meta(folder)
    kind = meta["transformers"]
    tensors = _read_weights(folder)
    if kind.get("remote_code"):  # our own names under "model."
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    try:
        tokenizer = tokenizer_from_state(meta["tokenizer_state"])
        # a tensor the model takes besides its config (efficientlm's external table) comes from these weights
        net = build_model(meta["model"], tokenizer.vocab_size, tensors if kind.get("remote_code") else None)
    except EfficiaError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    if kind.get("remote_code"):
        _load_into(net, tensors, f"{folder / WEIGHTS}")
    else:
        require_transformers()
        from transformers import AutoConfig

        from efficia.inference.hf.native import NATIVE, convert, unique_tensors

        natives = {n.hf_class: n for candidates in NATIVE.values() for n in candidates}
        if kind.get("class") not in natives:
            raise CheckpointError(f"{folder / META}: unknown transformers class {kind.get('class')!r}")
        config = AutoConfig.from_pretrained(str(folder))
        ours, _ = unique_tensors(net)
        _load_into(net, convert(natives[kind["class"]], config, tensors, ours, net.n_layer, to_hf=False),
                   f"{folder}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = {"model": meta["model"], "tokenizer": meta.get("tokenizer", {}), "sampling": meta["sampling"]}
    return LoadedModel(net.to(device, weights_dtype(t.dtype for t in tensors.values())).eval(), tokenizer, cfg)


def _meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{folder / META} is unreadable ({type(err).__name__}); export the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not all(
            isinstance(meta.get(k), dict) for k in ("model", "tokenizer_state", "sampling", "transformers")):
        raise CheckpointError(f"{folder / META} is not an efficia transformers export; export the model again")
    return meta


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors (one file, or the shards an index lists)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / f"{WEIGHTS}.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(folder / name)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{folder / name} is missing or corrupt ({type(err).__name__}); "
                                  "export the model again") from None
    return tensors


def _load_into(net: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy an export's tensors into net by name, after the renaming checkpoints get too (`current_names`: an
    export made before a model renamed its parameters still loads)."""
    from efficia.inference.hf.native import unique_tensors
    from efficia.models.construction import current_names

    tensors = current_names(net, tensors)
    ours, aliases = unique_tensors(net)
    missing = [k for k in ours if k not in tensors]
    unexpected = [k for k in tensors if k not in ours and k not in aliases]
    if missing or unexpected:
        what = (f"lacks efficia's tensor {missing[0]}" if missing
                else f"has a tensor efficia's model lacks: {unexpected[0]}")
        raise CheckpointError(f"{where} {what} ({len(missing)} missing, {len(unexpected)} unexpected); "
                              "export the model again")
    for name, target in ours.items():
        if tensors[name].shape != target.shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, the model config gives "
                                  f"{tuple(target.shape)}; export the model again")
        with torch.no_grad():
            target.copy_(tensors[name])
