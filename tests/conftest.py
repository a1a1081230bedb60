"""Shared fixtures: real Hydra composition of conf/, offline data from ../shared/data (or $EFFICIA_DATA_DIR)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

if "EFFICIA_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["EFFICIA_DATA_DIR"] = str(SHARED_DATA)
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED_DATA / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken")
os.environ.setdefault("EFFICIA_CACHE_DIR", tempfile.mkdtemp(prefix="efficia-test-cache-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose_train(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose like `python train.py <overrides>` does, with the run's output dir set to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        if "output_dir" in cfg:
            cfg.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it to train.py
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path):
    def make(*overrides: str, config_name: str = "train") -> DictConfig:
        return compose_train(list(overrides), tmp_path / "run", config_name)

    return make


def require_data() -> None:
    data_dir = os.environ.get("EFFICIA_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail("tiny Shakespeare not found: set EFFICIA_DATA_DIR to a folder holding tinyshakespeare/input.txt")
