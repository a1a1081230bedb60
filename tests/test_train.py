"""Real Hydra composition and real Lightning runs: every config option, learning, checkpoints, resume."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import efficia
from efficia.cli import run_cli
from efficia.errors import CheckpointError, TokenizerError
from efficia.inference.sampling_cli import sample
from efficia.training.run import train
from tests.conftest import CONF, ROOT, require_data

FAST = ["debug=fast_dev_run", "logger=csv"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def run_fast(make_cfg, *overrides: str) -> dict:
    require_data()
    cfg = make_cfg(*FAST, *overrides)
    return train(cfg)


# -- every yaml in conf/ composes and runs fast_dev_run -----------------------------------------

@pytest.mark.parametrize("model", options("model"))
def test_every_model_runs_fast_dev_run(make_cfg, model: str) -> None:
    result = run_fast(make_cfg, f"model={model}")
    assert result["global_step"] == 1 and math.isfinite(result["metrics"]["train/loss"])


# a run at a size no debug preset shrinks (scale=seed, an experiment's pinned model) takes rows of 2: the sizes are
# what is under test, and one step of 24 (or 64) rows at them costs tens of seconds on a CPU
TWO_ROWS = ["data.batch_size=2", "data.val_batch_size=2"]


@pytest.mark.parametrize("scale", options("scale"))
def test_every_scale_composes_and_runs(make_cfg, scale: str) -> None:
    """fast_dev_run selects scale=tiny, so the scale under test is applied after it on the command line."""
    cfg = make_cfg(*FAST, f"scale={scale}", *TWO_ROWS)
    sizes = OmegaConf.load(CONF / "scale" / f"{scale}.yaml") or {}
    assert cfg.model.d_model == sizes.get("d_model", OmegaConf.load(CONF / "model" / "gpt.yaml").d_model)
    require_data()
    assert train(cfg)["global_step"] == 1


@pytest.mark.parametrize("trainer", [t for t in options("trainer") if t != "ddp_cpu"])
def test_every_trainer_preset_runs_on_cpu(make_cfg, trainer: str, caplog) -> None:
    result = run_fast(make_cfg, f"trainer={trainer}")
    assert result["global_step"] == 1
    if not torch.cuda.is_available():  # a preset for GPUs says in one line what runs instead
        said = [r.getMessage() for r in caplog.records if "no CUDA device" in r.getMessage()]
        expected = {"ddp": "trainer=ddp: no CUDA device, so this is one process on the CPU",
                    "rtx3060": "GPUMemoryBudget: no CUDA device", "rtx4090": "GPUMemoryBudget: no CUDA device"}
        assert [line[:len(expected[trainer])] for line in said] == ([expected[trainer]] if trainer in expected
                                                                    else []), said


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_runs(make_cfg, logger: str) -> None:
    require_data()
    cfg = make_cfg("debug=limit", f"logger={logger}", "trainer.max_steps=4", "trainer.val_check_interval=2",
                   "trainer.log_every_n_steps=1")
    result = train(cfg)
    assert result["log_dirs"], f"logger={logger} wrote nothing"
    out = Path(cfg.output_dir)
    if logger == "wandb":  # no login here: offline, with the sync command printed
        assert result["wandb_offline_dirs"] and list(out.glob("wandb/offline-run-*"))
    if logger == "csv":
        metrics = (out / "csv" / "metrics.csv").read_text()
        for key in ("train/loss", "val/loss", "val/ppl", "val/bpb", "train/tokens", "lr-MuonWithAdamW", "tok/s"):
            assert key in metrics
    if logger == "tensorboard":
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))


OTHER_OPTIONS = [f"{group}={option}" for group in ("tokenizer", "optimizer", "experiment", "debug", "callbacks", "data",
                                                    "hparams_search") for option in options(group)]


@pytest.mark.parametrize("choice", OTHER_OPTIONS)
def test_every_other_option_runs(make_cfg, choice: str) -> None:
    group, option = choice.split("=")
    if choice == "hparams_search=optuna":  # its sweeper is the optional [sweeps] extra
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[sweeps]'")
    extra = [] if group == "debug" else ["debug=fast_dev_run"]
    if group == "tokenizer" and option == "ids":
        extra.append("data=mqar")  # token ids need data that are token ids; text data refuse them (test_mqar)
    if group == "debug" and option == "overfit":
        extra = ["trainer.max_steps=3", "trainer.val_check_interval=3"]
    cfg = make_cfg(choice, *extra, "logger=csv")
    tiny = OmegaConf.load(CONF / "scale" / "tiny.yaml")
    if any(cfg.model[key] != value for key, value in tiny.items()):  # sizes a recipe sets itself stay
        cfg = make_cfg(choice, *extra, *TWO_ROWS, "logger=csv")
    require_data()
    result = train(cfg)
    assert result["global_step"] >= 1, choice


def test_rtx_presets_budget_their_card(make_cfg) -> None:
    for preset, gb in (("rtx3060", 12), ("rtx4090", 24)):
        cfg = make_cfg(f"trainer={preset}")
        assert cfg.callbacks.gpu_budget.memory_gb == gb
        assert cfg.trainer.precision == "bf16-mixed"
    assert "gpu_budget" not in make_cfg("trainer=cpu").callbacks


# -- learning, checkpoints, sampling --------------------------------------------------------------

def unigram_entropy(tokens: torch.Tensor) -> float:
    counts = torch.tensor(list(Counter(tokens.tolist()).values()), dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def test_tiny_gpt_learns_and_its_checkpoint_samples(make_cfg, capsys) -> None:
    require_data()
    cfg = make_cfg("scale=tiny", "model.max_seq_len=64", "logger=csv", "trainer.max_steps=300",
                   "trainer.val_check_interval=150", "data.batch_size=16", "optimizer.lr=3e-3",
                   "scheduler.warmup_steps=20")
    result = train(cfg)
    dm = instantiate(cfg.data, tokenizer={"kind": "char"})  # the same data the run used
    dm.prepare()
    h_unigram = unigram_entropy(dm.val_tokens)  # about 3.3 nats for Shakespeare's characters
    assert result["metrics"]["val/loss"] < h_unigram - 0.5, (result["metrics"], h_unigram)
    assert result["metrics"]["val/bpb"] == pytest.approx(result["metrics"]["val/loss"] / math.log(2), rel=1e-4)
    assert Path(result["loss_curve"]).stat().st_size > 10_000
    out = capsys.readouterr().out
    assert f"sample: python sample.py ckpt={result['best_ckpt']}" in out

    # the checkpoint alone rebuilds model + tokenizer, loading with weights_only
    model = efficia.load(result["last_ckpt"])
    texts = model.generate("ROMEO:", num_samples=3, seed=0, max_new_tokens=40, temperature=0.8)
    assert len(texts) == 3 and all(t.startswith("ROMEO:") and len(t) == 46 for t in texts)
    assert model.generate("ROMEO:", seed=1, max_new_tokens=20) == model.generate("ROMEO:", seed=1, max_new_tokens=20)

    sample_cfg = make_cfg(f"ckpt={result['last_ckpt']}", "prompt=ROMEO:", "max_new_tokens=30", "seed=0",
                          config_name="sample")
    streamed = sample(sample_cfg)
    printed = capsys.readouterr().out
    assert printed.strip() == streamed[0].strip() and len(streamed[0]) == 36

    proc = cli("sample.py", f"ckpt={result['last_ckpt']}", "interactive=true", "max_new_tokens=10", "seed=0",
               stdin="ROMEO:\nJULIET:\n\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("prompt> ") == 3 and "ROMEO:" in proc.stdout and "JULIET:" in proc.stdout

    outside = make_cfg(f"ckpt={result['last_ckpt']}", "prompt='ROMEO ☃:'", config_name="sample")
    with pytest.raises(TokenizerError, match="outside this model's 65-character vocabulary: '☃'"):
        sample(outside)


def test_resume_continues_step_count_and_schedule(make_cfg) -> None:
    require_data()
    common = ["debug=limit", "logger=csv", "trainer.val_check_interval=5", "scheduler.warmup_steps=2"]
    first_cfg = make_cfg(*common, "trainer.max_steps=10")
    first = train(first_cfg)
    ckpt = torch.load(first["last_ckpt"], weights_only=True)
    assert ckpt["global_step"] == 10 and ckpt["tokens_seen"] == 10 * first_cfg.data.batch_size * 32
    resumed = train(make_cfg(*common, "trainer.max_steps=15", f"ckpt_path={first['last_ckpt']}"))
    assert resumed["global_step"] == 15
    after = torch.load(resumed["last_ckpt"], weights_only=True)
    assert after["tokens_seen"] == 15 * first_cfg.data.batch_size * 32
    assert after["lr_schedulers"][0]["last_epoch"] == 15


def test_resume_into_another_model_is_one_clear_error(make_cfg) -> None:
    require_data()
    first = train(make_cfg("debug=limit", "logger=csv", "trainer.max_steps=2"))
    with pytest.raises(CheckpointError, match=r"different model \(n_layer=2 there vs 3 here\)"):
        train(make_cfg("debug=limit", "logger=csv", "model.n_layer=3", f"ckpt_path={first['last_ckpt']}"))
    with pytest.raises(CheckpointError, match="does not exist"):
        train(make_cfg("debug=limit", "logger=csv", "ckpt_path=/nonexistent/last.ckpt"))


def test_no_half_written_checkpoints(make_cfg) -> None:
    require_data()
    result = train(make_cfg("debug=limit", "logger=csv"))
    files = sorted(p.name for p in Path(result["last_ckpt"]).parent.iterdir())
    assert "last.ckpt" in files and all(f.endswith(".ckpt") for f in files), files


# -- the command line, as a user runs it ----------------------------------------------------------

def cli(*args: str, cwd: Path = ROOT, timeout: int = 240, stdin: str | None = None) -> subprocess.CompletedProcess:
    launcher_vars = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, input=stdin if stdin is not None else "")


def test_help_lists_the_config_groups() -> None:
    out = cli("train.py", "--help").stdout
    for group in ("model", "scale", "data", "tokenizer", "trainer", "optimizer", "logger", "callbacks",
                  "experiment", "debug"):
        assert f"{group}: " in out, group


def test_unknown_group_value_fails_with_hydras_message() -> None:
    proc = cli("train.py", "model=nope")
    assert proc.returncode != 0
    assert "Could not find 'model/nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_is_one_clear_line(tmp_path: Path) -> None:
    """The one train.py process of the one-line path; the errors of every other stage: the test below."""
    proc = cli("train.py", f"data.path={tmp_path}/nothing.txt", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.path=")
    assert "Traceback" not in proc.stderr


ONE_LINE = {  # a bad override from each stage a run goes through -> what its line says
    "seed=abc": "seed='abc': give a whole number",  # the run's own checks
    "data.path=/nonexistent/input.txt": "data.path=/nonexistent/input.txt",  # reading the data
    "model.n_head=3": r"d_model \(32\) must be divisible by n_head \(3\)",  # building the model
    "model.pos_emb=alibi": "pos_emb must be 'learned' or 'rope', got 'alibi'",
    "+model.heads=2": r"unknown key.s. heads",  # a key the model's constructor does not take
}


@pytest.mark.parametrize("override", sorted(ONE_LINE))
def test_errors_meant_for_a_person_are_one_line_and_exit_2(make_cfg, capsys, override: str) -> None:
    """What train.py does with them (efficia.cli.run_cli, as `main` calls it), in this process: one `error:` line on
    stderr, no trace, exit 2. The train.py subprocess above shows `main` goes through it."""
    require_data()
    cfg = make_cfg("scale=tiny", "logger=csv", override)
    with pytest.raises(SystemExit) as info:
        run_cli(train, cfg)
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(ONE_LINE[override], errors[0]), errors[0]


def test_sample_cli_errors_are_one_line(tmp_path: Path) -> None:
    """One sample.py process; the other refusals (no ckpt=, a file that is no checkpoint, bad sampling values)
    are checked in-process: tests/test_bad_inputs.py::test_sample_refuses_bad_inputs_in_one_line."""
    proc = cli("sample.py", f"ckpt={tmp_path / 'missing.ckpt'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("error:") and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.xdist_group("processes")
def test_ddp_cpu_trains_with_two_processes(tmp_path: Path) -> None:
    require_data()
    proc = cli("train.py", "trainer=ddp_cpu", "scale=tiny", "logger=csv", "trainer.max_steps=6",
               "trainer.val_check_interval=3", "trainer.limit_val_batches=2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 6 steps" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    batch = OmegaConf.load(CONF / "data" / "shakespeare.yaml").batch_size
    assert ckpt["tokens_seen"] == 6 * batch * 32 * 2  # both processes' tokens are counted


def test_yinggem_on_a_3060_preset_composes_and_runs_on_cpu(make_cfg) -> None:
    cfg = make_cfg("model=yinggem", "trainer=rtx3060", *FAST)
    assert cfg.callbacks.gpu_budget.memory_gb == 12 and cfg.model.name == "yinggem"
    assert train(cfg)["global_step"] == 1


def test_yinggem_experiment_is_the_seed_recipe(make_cfg) -> None:
    cfg = make_cfg("experiment=yinggem_shakespeare")
    assert (cfg.model.name, cfg.model.d_model, cfg.model.n_layer, cfg.model.window) == ("yinggem", 768, 12, 512)
    assert (cfg.data.seq_len, cfg.data.batch_size, cfg.tokenizer.encoding) == (1024, 8, "gpt2")
    assert cfg.optimizer._target_ == "torch.optim.Adafactor" and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.callbacks.early_stopping.patience == 3
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.repetition_penalty) == (0.9, 0.85, 1.2)
    assert make_cfg("experiment=yinggem_shakespeare", "trainer=rtx3060").trainer.precision == "bf16-mixed"
