"""Shared fixtures: real Hydra composition of conf/, offline data from ../shared/data (or $EFFICIA_DATA_DIR)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# One thread per test process (and per train.py it starts): the suite runs `-n 2` on 2 cores, and tiny tensors gain
# nothing from more; two workers' OpenMP teams spinning on the same cores made each step several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from efficia.config import CONF_DIR, compose_run

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch may have been imported before this file


def _measure_cpu_peak_once_per_process():
    """Every fit starts by timing n x n matmuls for the MFU's CPU peak (about a second, more than a tiny run's
    training). In a test process the CPU and thread count do not change: each dtype is measured for real once,
    then reused. Calls with explicit sizes (tests/test_throughput.py) always measure."""
    from efficia.training import throughput

    measure, measured = throughput.measure_cpu_peak, {}

    def once(dtype: str = "fp32", *args, **kwargs) -> float:
        if args or kwargs:
            return measure(dtype, *args, **kwargs)
        key = (dtype, torch.get_num_threads())
        if key not in measured:
            measured[key] = measure(dtype)
        return measured[key]

    throughput.measure_cpu_peak = once


_measure_cpu_peak_once_per_process()

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
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "EFFICIA_WIKIPEDIA_FILES" not in os.environ:  # data=wikipedia reads the local sample, never the hub
    os.environ["EFFICIA_WIKIPEDIA_FILES"] = str(Path(os.environ.get("EFFICIA_DATA_DIR", SHARED_DATA))
                                                / "wikipedia-sample" / "*.parquet")


@pytest.fixture
def make_cfg(tmp_path: Path):
    """Each composed run gets its own output folder (run, run-2, ...), as train.py would give it."""
    made: list[int] = []

    def make(*overrides: str, config_name: str = "train") -> DictConfig:
        made.append(1)
        return compose_run(list(overrides), tmp_path / ("run" if len(made) == 1 else f"run-{len(made)}"),
                           config_name)

    return make


def require_data() -> None:
    data_dir = os.environ.get("EFFICIA_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail("tiny Shakespeare not found: set EFFICIA_DATA_DIR to a folder holding tinyshakespeare/input.txt")


TINY_VOCAB = 37


def write_external_table(path: Path, vocab_size: int = TINY_VOCAB, dim: int = 12, seed: int = 0) -> Path:
    """A frozen per-token external embedding table [vocab, dim] as a .safetensors file (efficientlm's
    adapter source), written atomically so parallel test processes never read half a file."""
    from safetensors.torch import save_file

    if not path.is_file():
        table = torch.randn(vocab_size, dim, generator=torch.Generator().manual_seed(seed))
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"table": table}, str(tmp))
        os.replace(tmp, path)
    return path


# The adapter-on variant of the generic model tests points at this table. A fixed path (same content every
# time), so test ids are the same in every process; written once per session by the fixture below.
EXTERNAL_TABLE = Path(tempfile.gettempdir()) / f"efficia-test-external-{TINY_VOCAB}x12.safetensors"


@pytest.fixture(scope="session", autouse=True)
def external_table() -> Path:
    return write_external_table(EXTERNAL_TABLE)


def tiny_model_cfg(name: str, *overrides: str) -> dict:
    """conf/model/<name>.yaml at scale=tiny (with its tiny model_scale), plus overrides such as "model.window=4"."""
    cfg = compose_run([f"model={name}", "scale=tiny", *overrides], tempfile.gettempdir())
    return OmegaConf.to_container(cfg.model, resolve=True)


def build_tiny(name: str, *overrides: str, vocab_size: int = TINY_VOCAB, seed: int = 0):
    """The tiny model of `name` built from its own yaml, so the yaml is tested too."""
    from efficia.build import build_model

    torch.manual_seed(seed)
    return build_model(tiny_model_cfg(name, *overrides), vocab_size)


@pytest.fixture
def tiny_model():
    """The one tiny-model builder: tiny_model("yinggem", "model.n_kv_head=1", vocab_size=11, seed=3)."""
    return build_tiny


def pytest_collection_modifyitems(config, items) -> None:
    """`cuda` tests need a GPU: skipped (and said so) where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny tensors: thread hand-offs cost more than they save (and a busy machine makes them slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
