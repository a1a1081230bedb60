"""Shared fixtures: real Hydra composition of conf/, offline data from ../shared/data (or $EFFICIA_DATA_DIR)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from omegaconf import DictConfig

from efficia.config import CONF_DIR, compose_run

ROOT = Path(__file__).resolve().parents[1]
CONF = CONF_DIR
SHARED_DATA = ROOT.parent / "shared" / "data"

if "EFFICIA_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["EFFICIA_DATA_DIR"] = str(SHARED_DATA)
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED_DATA / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken")
os.environ.setdefault("EFFICIA_CACHE_DIR", tempfile.mkdtemp(prefix="efficia-test-cache-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def make_cfg(tmp_path: Path):
    def make(*overrides: str, config_name: str = "train") -> DictConfig:
        return compose_run(list(overrides), tmp_path / "run", config_name)

    return make


def require_data() -> None:
    data_dir = os.environ.get("EFFICIA_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail("tiny Shakespeare not found: set EFFICIA_DATA_DIR to a folder holding tinyshakespeare/input.txt")
