"""Sweeps: W&B run names and groups, the compare preset covers every model, multirun and Optuna reports."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from efficia.config import compose_run
from efficia.models import MODELS
from efficia.training.run import train
from efficia.training.sweep import RECORD, write_report
from tests.conftest import CONF, require_data
from tests.test_train import cli

# two validations' worth of nothing: a sweep's machinery, not its learning, is under test
DEFAULT_BATCH = OmegaConf.load(CONF / "data" / "shakespeare.yaml").batch_size
FAST_SWEEP = ["debug=limit", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
              "callbacks.progress_bar=null"]


def installed(module: str) -> bool:
    """Whether an optional extra's module can be imported; find_spec raises, not returns None, when its parent
    package (the hydra_plugins namespace) is missing."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def read_summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_run_names_tell_jobs_apart(tmp_path: Path) -> None:
    """W&B names: the model, then the job's overrides; no trailing `gpt-` for a plain run; no group outside a sweep."""
    plain = compose_run(["logger=wandb"], tmp_path)
    assert plain.run_name == "gpt" and plain.logger.wandb.name == "gpt" and plain.logger.wandb.group is None
    cfg = compose_run(["model=yinggem", "optimizer.lr=0.003", "trainer=cpu", "logger=wandb"], tmp_path)
    assert cfg.logger.wandb.name == "yinggem:optimizer.lr=0.003"
    assert list(cfg.logger.wandb.tags) == ["yinggem"]


@pytest.mark.parametrize("preset", ["compare_small", "compare_wikipedia"])
def test_compare_presets_sweep_every_registered_model_on_one_budget(preset: str) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        sweep = parser.parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
        swept = {o.get_key_element(): list(o.sweep_string_iterator()) if o.is_sweep_override()
                 else [o.get_value_element_as_str()] for o in sweep}
        jobs = {name: compose("train", overrides=[f"experiment={preset}", f"model={name}"])
                for name in swept["model"]}
    assert cfg.hydra.mode.name == "MULTIRUN"
    missing = sorted(set(MODELS) - set(swept["model"]))
    assert not missing, f"registered but not compared (add conf/model/<name>.yaml): {missing}"
    assert set(swept) == {"model"}
    budget = {(j.seed, j.data.seq_len, j.data.batch_size, j.trainer.max_steps, j.tokenizer.kind, j.data._target_,
               j.model.d_model, j.model.n_layer) for j in jobs.values()}
    assert len(budget) == 1, budget  # same seed, tokens, data, tokenizer and scale for every architecture
    assert all(j.callbacks.early_stopping is None for j in jobs.values())  # nobody stops short of the budget
    expected = {"compare_small": ("char", "ShakespeareDataModule"),
                "compare_wikipedia": ("tiktoken", "WikipediaDataModule")}
    assert {(j.tokenizer.kind, j.data._target_.rsplit(".", 1)[1]) for j in jobs.values()} == {expected[preset]}


def test_lr_search_is_a_grid_of_one_job_per_learning_rate() -> None:
    """hparams_search=lr, as Hydra's basic sweeper expands it (a multirun job of it runs: test_multirun_writes_...;
    the config itself runs fast_dev_run: tests/test_train.py::test_every_other_option_runs)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["hparams_search=lr"], return_hydra_config=True)
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        (grid,) = parser.parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    assert grid.get_key_element() == "optimizer.lr"
    assert [float(v) for v in grid.sweep_string_iterator()] == [3e-4, 1e-3, 3e-3]


def test_a_resumed_run_records_its_whole_history(make_cfg) -> None:
    require_data()
    common = ["debug=limit", "logger=csv", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]
    first = train(make_cfg(*common, "trainer.max_steps=4"))
    cfg = make_cfg(*common, "trainer.max_steps=6", f"ckpt_path={first['last_ckpt']}")
    train(cfg)
    record = json.loads((Path(cfg.output_dir) / RECORD).read_text())
    per_step = cfg.data.batch_size * cfg.data.seq_len
    assert [(v["step"], v["tokens"]) for v in record["val"]] == [(s, s * per_step) for s in (2, 4, 6)]
    walls = [v["wall_s"] for v in record["val"]]
    assert walls == sorted(walls) and record["wall_s"] >= walls[-1]  # wall time goes on from the first session
    assert record["best_val_loss"] == min(v["loss"] for v in record["val"])
    assert record["final_val_loss"] == record["val"][-1]["loss"] and record["steps"] == 6


@pytest.mark.slow
def test_multirun_writes_the_comparison_report_and_one_wandb_run_per_job(tmp_path: Path) -> None:
    require_data()
    proc = cli("train.py", "-m", "model=gpt,yinggem", *FAST_SWEEP, "logger=wandb", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_summary(tmp_path)
    assert [(r["job"], r["model"], r["status"]) for r in rows] == [("0", "gpt", "done"), ("1", "yinggem", "done")]
    printed = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"model=(\w+): ([\d,]+) parameters", proc.stdout)}
    for r in rows:
        assert int(r["params"]) == printed[r["model"]]
        assert int(r["steps"]) == 2 and float(r["tokens"]) == 2 * DEFAULT_BATCH * 32
        assert math.isfinite(float(r["best_val_loss"])) and float(r["best_val_bpb"]) > 0
        assert float(r["wall_s"]) > 0 and float(r["tokens_per_s"]) > 0
    gpt, yinggem = rows
    assert int(gpt["cache_bytes@8192"]) == 8 * int(gpt["cache_bytes@1024"])  # full K/V: linear in T
    assert int(yinggem["cache_bytes@8192"]) == int(yinggem["cache_bytes@1024"])  # a rolling window: constant
    record = json.loads((tmp_path / "0" / "run_record.json").read_text())
    assert [(v["step"], v["tokens"]) for v in record["val"]] == [(2, 2 * DEFAULT_BATCH * 32)]

    md = (tmp_path / "summary.md").read_text()
    assert "| `model=gpt` |" in md and "| `model=yinggem` |" in md and "Every job: `debug=limit" in md
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sweep report: " in proc.stdout

    runs = sorted(tmp_path.glob("*/wandb/offline-run-*/*.wandb"))
    assert len(runs) == 2 and proc.stdout.count("wandb sync ") == 2  # each job its own run, each told how to upload
    for run, model in zip(runs, ("gpt", "yinggem"), strict=True):
        raw = run.read_bytes()  # the offline run's records: name, group and summary are in there verbatim
        name = f"{model}:callbacks.progress_bar=null,trainer.limit_val_batches=1,trainer.max_steps=2,"
        assert name.encode() in raw  # the model, then the job's own overrides
        assert f"{tmp_path} model={model} debug=limit".encode() in raw  # grouped by sweep and model (not seed or lr)
        for key in (b"cache_bytes@1024", b"cache_bytes@8192", b"tokens_per_s", b"best_val_loss", b"val/tokens"):
            assert key in raw, key

    (tmp_path / "1" / "run_record.json").unlink()  # a job that died: still a row, saying so
    write_report(tmp_path)
    assert read_summary(tmp_path)[1]["status"].startswith("no record")


@pytest.mark.slow
@pytest.mark.skipif(not installed("hydra_plugins.hydra_optuna_sweeper"),
                    reason="hydra-optuna-sweeper is not installed: pip install -e '.[sweeps]'")
def test_optuna_sweep_minimises_val_loss_and_reports_each_trial(tmp_path: Path) -> None:
    require_data()
    proc = cli("train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *FAST_SWEEP, "logger=csv",
               f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    rows = read_summary(tmp_path)
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows)
    searched = ("optimizer.lr=", "scheduler.warmup_steps=", "optimizer.weight_decay=", "model.dropout=")
    trials = [[o for o in r["overrides"].split() if o.startswith(searched)] for r in rows]
    assert all(len(t) == 4 for t in trials) and trials[0] != trials[1]
    assert result["best_value"] == pytest.approx(min(float(r["final_val_loss"]) for r in rows), abs=1e-6)
    assert set(result["best_params"]) == {s.rstrip("=") for s in searched}
