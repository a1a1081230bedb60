"""Safe checkpoint loading and the Python API: `efficia.load(path).generate(text, ...)`.

Checkpoints load with `torch.load(weights_only=True)`: no code in a checkpoint ever runs.
The run config and tokenizer state inside rebuild the model without the training data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from efficia.build import build_model, read_checkpoint, weights_dtype
from efficia.checks import check_sampling, is_int, joined_lines
from efficia.data.tokenizers import Tokenizer, tokenizer_from_state
from efficia.errors import CheckpointError, ConfigError
from efficia.inference.generate import generate_tokens
from efficia.models.decoder import LanguageModel

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")


class LoadedModel:
    """A trained model and its tokenizer, ready to sample from."""

    def __init__(self, net: LanguageModel, tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
        self.net, self.tokenizer, self.cfg = net, tokenizer, cfg
        self.sampling = {k: cfg["sampling"][k] for k in SAMPLING_KEYS}

    @property
    def device(self) -> torch.device:
        return self.net.device

    def quantize(self, mode: str | None) -> LoadedModel:
        """`quantize("int8")`: dynamic int8 Linear layers for CPU sampling (quantize.py), in place; None: as is."""
        from efficia.inference.quantize import check_mode, quantize_int8

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
    net = build_model(cfg["model"], tokenizer.vocab_size, weights)
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit model={cfg['model'].get('name')} as configured "
                              f"inside the checkpoint ({joined_lines(err)})") from None
    dtype = weights_dtype(t.dtype for t in weights.values())  # a bf16-true run's checkpoint samples in bf16
    return LoadedModel(net.to(pick_device(device), dtype).eval(), tokenizer, cfg)


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
