"""Safe checkpoint loading and the Python API: `efficia.load(path).generate(text, ...)`.

Checkpoints load with `torch.load(weights_only=True)`: no code in a checkpoint ever runs.
The run config and tokenizer state inside rebuild the model without the training data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from efficia.checks import check_sampling, is_int
from efficia.data.tokenizers import Tokenizer, tokenizer_from_state
from efficia.errors import CheckpointError, ConfigError
from efficia.generate import generate_tokens
from efficia.models import MODELS, build_model
from efficia.models.decoder import LanguageModel

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path train.py printed "
                              "(e.g. outputs/<date>/<time>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse an untrusted file means "not a checkpoint"
        reason = str(err).splitlines()[0].split(".")[0][:100] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupted or not a torch "
                              f"file: {reason}); use a complete .ckpt written by train.py") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "cfg" not in hparams or "tokenizer_state" not in hparams:
        raise CheckpointError(f"{path} is a torch file but not an efficia checkpoint (no run config "
                              "inside); use a .ckpt written by efficia's train.py")
    return ckpt


def load_external_table(source: str, key: str | None, vocab_size: int) -> torch.Tensor:
    """A frozen per-token table [vocab, d_ext]: the token embeddings of another efficia checkpoint (.ckpt) or a
    matrix in a .safetensors file (`key` names it when the file holds several). Rows are token ids."""
    path = Path(source).expanduser()
    hint = "set model.external.source to an efficia .ckpt or a .safetensors matrix, or null for no adapter"
    if not path.is_file():
        raise ConfigError(f"efficientlm: external embedding source {path} does not exist; {hint}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if key is None and len(tensors) != 1:
            raise ConfigError(f"efficientlm: {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); "
                              "name one with model.external.key")
        table = tensors[key] if key is not None else next(iter(tensors.values()))
    else:
        weights = read_checkpoint(path)["state_dict"]
        name = key or "net.tok_emb.weight"
        if name not in weights:
            raise ConfigError(f"efficientlm: checkpoint {path} has no tensor {name!r}; name one with "
                              "model.external.key")
        table = weights[name]
    if table.dim() != 2 or table.shape[0] != vocab_size:
        raise ConfigError(f"efficientlm: external table in {path} has shape {tuple(table.shape)}, expected "
                          f"[{vocab_size}, d] (one row per token id of this tokenizer); use a table made with "
                          "the same tokenizer")
    return table.detach().float()


def model_inputs(model_cfg: Mapping[str, Any], vocab_size: int,
                 weights: Mapping[str, torch.Tensor | Sequence[int]] | None = None) -> dict[str, torch.Tensor | None]:
    """The tensors a model takes besides its config (the names in its class's `inputs`): efficientlm's frozen
    external table. `weights` (name -> tensor or shape) are the weights about to be loaded: a checkpoint or an
    export holds the table, so then only its shape is needed (a placeholder the load fills) and the source file
    may be gone. Otherwise the table is read from `model.external.source`."""
    cls = MODELS.get(model_cfg.get("name"))
    external = model_cfg.get("external")
    if "external_table" not in getattr(cls, "inputs", ()) or not isinstance(external, Mapping):
        return {}  # build_model refuses a bad model config in one line
    if external.get("source") is None:
        return {"external_table": None}
    if weights is not None and "external_table" in weights:
        saved = weights["external_table"]
        return {"external_table": torch.zeros(tuple(saved.shape if isinstance(saved, torch.Tensor) else saved))}
    return {"external_table": load_external_table(str(external["source"]), external.get("key"), vocab_size)}


def build_net(model_cfg: Mapping[str, Any], vocab_size: int,
              weights: Mapping[str, torch.Tensor | Sequence[int]] | None = None) -> LanguageModel:
    """The model a config describes, with the tensors it takes from outside (see `model_inputs`)."""
    return build_model(model_cfg, vocab_size, **model_inputs(model_cfg, vocab_size, weights))


class LoadedModel:
    """A trained model and its tokenizer, ready to sample from."""

    def __init__(self, net: LanguageModel, tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
        self.net, self.tokenizer, self.cfg = net, tokenizer, cfg
        self.sampling = {k: cfg["sampling"][k] for k in SAMPLING_KEYS}

    @property
    def device(self) -> torch.device:
        return self.net.device

    def quantize(self, mode: str | None) -> LoadedModel:
        """`quantize("int8")`: dynamic int8 Linear layers for CPU sampling (efficia.quantize), in place; None: as is."""
        from efficia.quantize import check_mode, quantize_int8

        check_mode(mode, self.device)
        if mode is not None:
            quantize_int8(self.net)
        return self

    def options(self, **overrides: Any) -> dict[str, Any]:
        """The checkpoint's sampling preset with every non-None override applied."""
        unknown = set(overrides) - set(SAMPLING_KEYS)
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {sorted(unknown)}; known: {', '.join(SAMPLING_KEYS)}")
        return {**self.sampling, **{k: v for k, v in overrides.items() if v is not None}}

    def prompt_text(self, text: str) -> str:
        """The prompt as its continuation follows it: token ids (`tokenizer=ids`) read "3 70 5 ", each number
        with its space, so "3 70 5" becomes "3 70 5 " and a continuation never fuses with the last id."""
        return self.tokenizer.decode(self.tokenizer.encode(text)) if self.tokenizer.kind == "ids" else text

    def generate(self, text: str, num_samples: int = 1, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None, **sampling: Any) -> list[str]:
        """Continue `text` num_samples times (one batch); returns prompt + continuation for each.

        `on_text` receives the first sample's new text as it is produced (streaming).
        """
        opts = check_sampling(self.options(**sampling))
        text = self.prompt_text(text)
        if not is_int(num_samples) or num_samples < 1:
            raise ConfigError(f"num_samples={num_samples!r}: give a whole number >= 1")
        if seed is not None and (not is_int(seed) or seed < 0):
            raise ConfigError(f"seed={seed!r}: give a whole number >= 0, or null for a random one")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise CheckpointError("the prompt is empty after tokenization; give at least one character")
        prompt = torch.tensor([ids] * num_samples, dtype=torch.long, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        max_new = opts.pop("max_new_tokens")
        new_tokens: list[torch.Tensor] = []
        pending: list[int] = []  # streamed tokens not yet shown: decoded alone, so streaming stays O(n)
        for token in generate_tokens(self.net, prompt, max_new, generator=generator, **opts):
            new_tokens.append(token)
            if on_text is not None:
                pending.append(int(token[0]))
                decoded = self.tokenizer.decode(pending)
                if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    on_text(decoded)
                    pending.clear()
        if not new_tokens:
            return [text] * num_samples
        stacked = torch.stack(new_tokens, dim=1).tolist()
        return [text + self.tokenizer.decode(row) for row in stacked]


def load(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuild model and tokenizer from an efficia checkpoint alone."""
    ckpt = read_checkpoint(path)
    hparams = ckpt["hyper_parameters"]
    cfg = hparams["cfg"]
    tokenizer = tokenizer_from_state(hparams["tokenizer_state"])
    weights = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net = build_net(cfg["model"], tokenizer.vocab_size, weights)
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit model={cfg['model'].get('name')} as configured "
                              f"inside the checkpoint ({str(err).splitlines()[0]})") from None
    return LoadedModel(net.to(pick_device(device)).eval(), tokenizer, cfg)


def pick_device(device: str) -> torch.device:
    """`auto`: CUDA when there is one; otherwise the named device, refused in one line if absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a device name; use auto, cpu, cuda or cuda:<n>") from None
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device={device} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          "use device=cpu or device=auto")
    if chosen.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: use auto, cpu, cuda or cuda:<n>")
    return chosen
