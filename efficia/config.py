"""Compose conf/ outside `@hydra.main` (tests, benchmarks, notebooks) exactly as train.py would."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# ${min:a,b} in yaml: e.g. an experiment's training length capped by the model's context, so a debug preset
# that shrinks the model (scale=tiny) still composes a valid run.
OmegaConf.register_new_resolver("min", min, replace=True)


def compose_run(overrides: list[str], output_dir: str | Path, config_name: str = "train") -> DictConfig:
    """The config `python train.py <overrides>` would get, with its output dir set to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        if "output_dir" in cfg:
            cfg.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} interpolations
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it over
    return cfg
