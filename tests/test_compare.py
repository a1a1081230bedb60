"""The comparison protocol (hydra/sweeper=compare): the stage-2 choice, seed statistics and ranking on records
written as jobs write them; a tiny comparison through the real sweeper, run again after an interruption;
sweeps that go on after a failed job and say how to resume after a signal; the FLOPs and CPU budgets."""

from __future__ import annotations

import json
import math
import re
import shlex
import signal
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from efficia.training.compare import (
    Protocol,
    best_rates,
    choose,
    parse_jobs,
    rank,
    seed_stats,
    stage_two,
    write_comparison,
)
from efficia.training.multirun import defining
from efficia.training.run import train
from efficia.training.sweep import FAILED, RECORD, collect
from efficia.training.throughput import run_flops_per_token
from tests.conftest import CONF, require_data
from tests.test_reliability import start_train, wait_for
from tests.test_sweep import FAST_SWEEP, read_summary
from tests.test_train import cli


def protocol(**changes: object) -> Protocol:
    """conf/hydra/sweeper/compare.yaml's protocol, with changes."""
    sweeper = yaml.safe_load((CONF / "hydra" / "sweeper" / "compare.yaml").read_text())
    chosen = {k: sweeper[k] for k in ("metric", "mode", "at", "seeds")} | changes
    return Protocol(lr_factors=tuple(sweeper["lr_factors"]), **chosen)


def write_job(sweep: Path, overrides: list[str], values: list[float] | None = None, key: str = "loss",
              error: str | None = None) -> Path:
    """A job folder as a finished (values: one per validation), failed (error) or unfinished job leaves it."""
    job = sweep / ",".join(sorted(overrides))
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if values is not None:
        val = [{"step": 10 * (i + 1), "tokens": 100.0 * (i + 1), "wall_s": 1.0, "cpu_s": 1.0, "loss": 3.0,
                "bpb": 4.0, key: v} for i, v in enumerate(values)]
        (job / RECORD).write_text(json.dumps({"steps": 10 * len(values), "val": val, "flops_per_token": 1e6}))
    if error is not None:
        (job / FAILED).write_text(json.dumps({"error": error, "overrides": overrides}))
    return job


def grid(sweep: Path, model: str, by_lr: dict[str, float | None], seed: int = 1337, key: str = "loss") -> None:
    for lr, value in by_lr.items():
        overrides = [f"model={model}", f"optimizer.lr={lr}", f"seed={seed}"]
        write_job(sweep, overrides, None if value is None else [value + 1.0, value], key,
                  error="training diverged" if value is None else None)


def results_by_model(sweep: Path, chosen: Protocol) -> dict[str, object]:
    return {r.group[0].removeprefix("model="): r for r in choose(parse_jobs(collect(sweep), chosen), chosen, 1337)}


def test_stage_two_runs_each_groups_best_rate_with_the_other_seeds(tmp_path: Path) -> None:
    grid(tmp_path, "gpt", {"0.001": 2.0, "0.00316": 1.9, "0.01": 2.1})
    grid(tmp_path, "optimus", {"0.001": 1.8, "0.00316": 1.8, "0.01": 2.5})   # a tie: the lower rate
    grid(tmp_path, "efficia", {"0.001": 2.2, "0.00316": 2.0, "0.01": None})  # the highest rate failed
    grid(tmp_path, "yinggem", {"0.001": 2.4, "0.00316": 2.2, "0.01": 2.1})   # still falling: the edge
    groups = [["model=gpt"], ["model=optimus"], ["model=efficia"], ["model=yinggem"]]
    jobs = stage_two(groups, best_rates(groups, tmp_path, protocol(), 1337), 1337, seeds=3)
    assert jobs == [[f"model={m}", f"optimizer.lr={lr}", f"seed={s}"]
                    for m, lr in (("gpt", "0.00316"), ("optimus", "0.001"), ("efficia", "0.00316"), ("yinggem", "0.01"))
                    for s in (1338, 1339)]
    results = results_by_model(tmp_path, protocol())
    assert {m: r.edge for m, r in results.items()} == {"gpt": None, "optimus": "lowest", "efficia": None,
                                                        "yinggem": "highest"}
    assert best_rates([["model=gpt"]], tmp_path, protocol(), 1337) == [0.00316]  # the groups this sweep compares


def test_diverged_and_unfinished_jobs_are_never_chosen(tmp_path: Path) -> None:
    grid(tmp_path, "gpt", {"0.001": math.nan, "0.00316": 2.0})  # a NaN validation: diverged, not the best
    write_job(tmp_path, ["model=gpt", "optimizer.lr=0.01", "seed=1337"])  # no record: running or stopped
    grid(tmp_path, "optimus", {"0.001": None, "0.01": None})  # every rate failed: no choice, no stage 2
    results = results_by_model(tmp_path, protocol())
    assert results["gpt"].best_lr == 0.00316
    assert results["gpt"].edge == "highest"  # an unfinished rate is not known to be worse
    md = write_comparison(tmp_path, protocol()).read_text()
    assert "| 1 | `model=gpt` | 0.00316 | 2.0000 (one seed) | 2.0000-2.0000 | 1 | stage 1 not finished |" in md
    assert results["optimus"].best_lr is None
    groups = [["model=gpt"], ["model=optimus"]]
    best = best_rates(groups, tmp_path, protocol(), 1337)
    assert best == [0.00316, None]
    assert stage_two(groups, best, 1337, seeds=2) == [["model=gpt", "optimizer.lr=0.00316", "seed=1338"]]


def test_a_metric_where_higher_is_better_and_the_best_validation(tmp_path: Path) -> None:
    write_job(tmp_path, ["model=gpt", "optimizer.lr=0.001", "seed=1337"], [0.9, 0.2], key="recall_acc")
    write_job(tmp_path, ["model=gpt", "optimizer.lr=0.01", "seed=1337"], [0.1, 0.5], key="recall_acc")
    final = protocol(metric="val/recall_acc", mode="max")
    assert results_by_model(tmp_path, final)["gpt"].best_lr == 0.01  # 0.5 > 0.2 at the end of the budget
    best = protocol(metric="val/recall_acc", mode="max", at="best")
    assert results_by_model(tmp_path, best)["gpt"].best_lr == 0.001  # 0.9 at its best validation


def test_one_test_settings_accuracy_can_be_the_metric(tmp_path: Path) -> None:
    def job(lr: str, pooled: float, at_64x8: float) -> None:  # the record as SweepRecord writes it
        path = write_job(tmp_path, ["model=gpt", f"optimizer.lr={lr}", "seed=1337"])
        val = [{"step": 10, "loss": 3.0, "bpb": 4.0, "recall_acc": pooled, "recall": {"64x8": at_64x8, "256x8": 0.0}}]
        (path / RECORD).write_text(json.dumps({"steps": 10, "val": val, "flops_per_token": 1e6}))

    job("0.001", pooled=0.6, at_64x8=0.7)
    job("0.01", pooled=0.5, at_64x8=0.9)
    assert results_by_model(tmp_path, protocol(metric="val/recall_acc", mode="max"))["gpt"].best_lr == 0.001
    per_setting = results_by_model(tmp_path, protocol(metric="val/recall_acc/64x8", mode="max"))["gpt"]
    assert per_setting.best_lr == 0.01 and per_setting.values() == [0.9]


def test_a_metric_no_run_records_is_refused_before_any_job(tmp_path: Path) -> None:
    # were it not refused, one tiny job would run, and the sweep would end without a comparable value
    proc = cli("train.py", "experiment=compare_small", "model=gpt", "hydra.sweeper.metric=val/recal_acc", "scale=tiny",
               "hydra.sweeper.lr_factors=[1]", "hydra.sweeper.seeds=1", *FAST_SWEEP,
               f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode != 0
    assert "hydra.sweeper.metric=val/recal_acc is not recorded by a run: use val/loss" in proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_seed_statistics_and_a_ranking_that_does_not_order_overlapping_ranges() -> None:
    s = seed_stats([1.0, 1.2, 1.1])
    assert (s.mean, s.low, s.high, s.n) == (pytest.approx(1.1), 1.0, 1.2, 3) and s.std == pytest.approx(0.1)
    assert seed_stats([2.0]).std == 0.0 and seed_stats([]) is None
    stats = {("a",): seed_stats([1.0, 1.1]), ("b",): seed_stats([1.05, 1.2]), ("c",): seed_stats([1.5, 1.6]),
             ("d",): seed_stats([0.5, 0.6])}
    assert rank(stats, protocol()) == {("d",): (1, 1), ("a",): (2, 3), ("b",): (2, 3), ("c",): (4, 4)}
    assert rank(stats, protocol(mode="max")) == {("c",): (1, 1), ("a",): (2, 3), ("b",): (2, 3), ("d",): (4, 4)}


def test_the_report_ranks_with_uncertainty_and_flags_the_edge(tmp_path: Path) -> None:
    grid(tmp_path, "gpt", {"0.001": 2.0, "0.00316": 1.9, "0.01": 2.1})
    grid(tmp_path, "yinggem", {"0.001": 2.4, "0.00316": 2.2, "0.01": 1.85})
    for seed, (g, y) in {1338: (1.87, 1.80), 1339: (1.93, 1.88)}.items():
        write_job(tmp_path, ["model=gpt", "optimizer.lr=0.00316", f"seed={seed}"], [g])
        write_job(tmp_path, ["model=yinggem", "optimizer.lr=0.01", f"seed={seed}"], [y])
    md = write_comparison(tmp_path, protocol()).read_text()
    edge = "best rate is the grid's highest: widen it"
    assert f"| 1-2 | `model=yinggem` | 0.01 | 1.8433 ± 0.0404 | 1.8000-1.8800 | 3 | {edge} |" in md
    assert "| 1-2 | `model=gpt` | 0.00316 | 1.9000 ± 0.0300 | 1.8700-1.9300 | 3 |  |" in md
    assert "| `model=gpt` | 2.0000 | **1.9000** | 2.1000 |" in md
    for png in ("compare_rates.png", "compare_curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "model=yinggem,optimizer.lr=0.01,seed=1339" / RECORD).unlink()  # its range no longer overlaps
    md = write_comparison(tmp_path, protocol()).read_text()
    assert "| 1 | `model=yinggem` |" in md and "| 2 | `model=gpt` |" in md


# -- through the real sweeper ------------------------------------------------------------------------------

COMPARE = ["experiment=compare_small", "model=gpt,yinggem", "hydra.sweeper.lr_factors=[1,10]", "hydra.sweeper.seeds=2",
           "logger=csv", *FAST_SWEEP]


def job_dir(sweep: Path, *overrides: str) -> Path:
    """A comparison job's folder: its overrides, sorted, as Hydra's override_dirname writes them."""
    extra = [o for o in FAST_SWEEP if not o.startswith("debug=")]  # debug=, logger=, experiment= are left out
    return sweep / ",".join(sorted([*overrides, *extra]))


def final_loss(job: Path) -> float:
    return json.loads((job / RECORD).read_text())["val"][-1]["loss"]


@pytest.mark.slow
def test_a_tiny_comparison_runs_both_stages_and_a_rerun_skips_what_finished(tmp_path: Path) -> None:
    require_data()
    proc = cli("train.py", *COMPARE, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage1 = {m: {lr: job_dir(tmp_path, f"model={m}", f"optimizer.lr={lr}", "seed=1337") for lr in ("0.001", "0.01")}
              for m in ("gpt", "yinggem")}
    best = {m: min(jobs, key=lambda lr: (final_loss(jobs[lr]), float(lr))) for m, jobs in stage1.items()}
    jobs = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert jobs == {p.name for d in stage1.values() for p in d.values()} | {
        job_dir(tmp_path, f"model={m}", f"optimizer.lr={lr}", "seed=1338").name for m, lr in best.items()}  # stage 2
    md = (tmp_path / "compare.md").read_text()
    for m, lr in best.items():
        assert re.search(rf"\| `model={m}` \| {lr} \| \d\.\d{{4}} ± \d\.\d{{4}} \| .* \| 2 \|", md), md
    assert "budget: equal steps: 2 optimizer steps per run" in md

    # interrupted: one stage-2 job never ran, one stage-1 job was stopped after its checkpoint
    stopped = stage1["gpt"]["0.01"]
    lost = job_dir(tmp_path, "model=yinggem", f"optimizer.lr={best['yinggem']}", "seed=1338")
    (stopped / RECORD).unlink()
    for path in sorted(lost.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    lost.rmdir()
    kept = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/" + RECORD)}
    proc = cli("train.py", *COMPARE, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished earlier, skipped") == 4
    assert f"resuming from {stopped}/checkpoints/last.ckpt" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing finished was run again
    assert (stopped / RECORD).is_file() and (lost / RECORD).is_file()


def test_a_rerun_may_change_how_jobs_log_and_stop_but_not_what_they_train() -> None:
    same = (["model=gpt", "data.seq_len=64", "logger=csv", "trainer.max_steps=5"],
            ["model=gpt", "data.seq_len=64", "logger=wandb", "trainer=cpu", "callbacks.progress_bar=null"])
    assert defining(same[0]) == defining(same[1]) == {"model=gpt", "data.seq_len=64"}
    assert defining(["model=gpt"]) != defining(["model=yinggem"])
    assert defining(["data.seq_len=64"]) != defining(["data.seq_len=256"])


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    require_data()
    proc = cli("train.py", "-m", "model=gpt", "model.n_head=5,2", *FAST_SWEEP, "logger=csv",
               f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = read_summary(tmp_path)
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0", "failed: d_model (32) must be divisible by n_head (5); change model.n_head or model.d_model"),
        ("1", "done")]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 jobs failed")
    again = cli("train.py", "-m", "model=gpt", "model.n_head=5,2", *FAST_SWEEP, "logger=wandb",  # logs elsewhere
                f"hydra.sweep.dir={tmp_path}")
    assert "failed earlier, skipped" in again.stdout and "finished earlier, skipped" in again.stdout
    other = cli("train.py", "-m", "model=gpt", "model.n_head=4,2", *FAST_SWEEP, "logger=csv",
                f"hydra.sweep.dir={tmp_path}")
    assert other.returncode == 2 and "holds a run of other overrides (model=gpt model.n_head=5" in other.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_sigterm_stops_the_sweep_writes_the_report_and_says_how_to_resume(tmp_path: Path) -> None:
    require_data()
    args = ["-m", "seed=1,2", "scale=tiny", "logger=csv", "trainer.max_steps=100000", "trainer.val_check_interval=4",
            "trainer.limit_val_batches=1", "callbacks.checkpoint.every_n_steps=4", "callbacks.progress_bar=null",
            f"hydra.sweep.dir={tmp_path}"]
    proc = start_train(tmp_path / "unused", *args)
    wait_for(tmp_path / "0" / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM at step" in err and "The sweep stopped at job 0" in err
    assert not (tmp_path / "1").exists()  # the rest is not started
    assert read_summary(tmp_path)[0]["status"].startswith("no record")
    command = shlex.split(err.split("resumes from its checkpoint): ")[1].strip().splitlines()[0])
    assert command[:2] == ["python", "train.py"] and f"hydra.sweep.dir={tmp_path}" in command
    step = int(re.search(r"at step (\d+)", err)[1])
    finish = [a if not a.startswith("trainer.max_steps=") else f"trainer.max_steps={step + 2}" for a in command[2:]]
    proc = cli("train.py", *[a for a in finish if not a.startswith("hydra.run.dir=")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    assert [(r["status"], r["steps"]) for r in read_summary(tmp_path)] == [("done", str(step + 2))] * 2


# -- budgets ----------------------------------------------------------------------------------------------

def test_a_flops_budget_sets_the_steps_and_a_cpu_budget_stops_the_run(make_cfg) -> None:
    require_data()
    common = ["debug=limit", "logger=csv", "trainer.limit_val_batches=1", "callbacks.progress_bar=null"]
    probe = OmegaConf.to_container(make_cfg(*common), resolve=True)
    per_token, seq_len = run_flops_per_token(probe, 65)
    per_step = per_token * probe["data"]["batch_size"] * seq_len
    cfg = make_cfg(*common, f"budget.flops={3.5 * per_step}", "trainer.max_steps=1000")
    result = train(cfg)
    assert result["global_step"] == 3  # floor(3.5 steps' FLOPs): trainer.max_steps gives way
    record = json.loads((Path(cfg.output_dir) / RECORD).read_text())
    assert record["flops"] == pytest.approx(3 * per_step) and record["val"][-1]["step"] == 3
    cfg = make_cfg(*common, "budget.cpu_seconds=0.5", "trainer.max_steps=2000", "trainer.val_check_interval=2000")
    result = train(cfg)
    record = json.loads((Path(cfg.output_dir) / RECORD).read_text())
    assert 0 < result["global_step"] < 2000 and record["val"][-1]["step"] == result["global_step"]  # validated
    assert 0.5 <= record["cpu_s"] < 5
