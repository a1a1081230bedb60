"""What `python sample.py` does, importable so tests drive it in-process."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from efficia.errors import ConfigError
from efficia.inference.loading import SAMPLING_KEYS, LoadedModel
from efficia.inference.pretrained import load_any


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def sample_once(model: LoadedModel, prompt: str, cfg: DictConfig) -> list[str]:
    options = {k: cfg.get(k) for k in SAMPLING_KEYS}
    if cfg.num_samples == 1:  # stream the single sample as it is generated
        write(model.prompt_text(prompt))
        texts = model.generate(prompt, num_samples=1, seed=cfg.seed, on_text=write, **options)
        write("\n")
        return texts
    texts = model.generate(prompt, num_samples=cfg.num_samples, seed=cfg.seed, **options)
    for i, text in enumerate(texts):
        write(f"--- sample {i + 1}/{len(texts)} ---\n{text}\n")
    return texts


def sample(cfg: DictConfig) -> list[str]:
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise ConfigError("no checkpoint given: python sample.py ckpt=outputs/<date>/<time>/checkpoints/last.ckpt "
                          '(train.py prints the path) prompt="ROMEO:"')
    for key in ("ckpt", "device"):
        if not isinstance(cfg[key], str):
            raise ConfigError(f"{key}={cfg[key]!r}: give a path/name as text")
    model = load_any(cfg.ckpt, device=cfg.device).quantize(cfg.quantize)  # a .ckpt file or an exported folder
    if not cfg.interactive:
        return sample_once(model, str(cfg.prompt), cfg)
    texts: list[str] = []
    while True:
        try:
            prompt = input("prompt> ")
        except EOFError:
            break
        if not prompt:
            break
        texts += sample_once(model, prompt, cfg)
    return texts
