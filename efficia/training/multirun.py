"""One job of a sweep (`python train.py -m ...`): a job that fails is recorded and the sweep goes on; a sweep run
again into its own folder (`hydra.sweep.dir=<that folder>`) skips the jobs that finished and resumes the one
that was stopped.

A job's folder ends in one of three states: `run_record.json` (finished), `job_failed.json` (its error line;
kept as failed when the sweep is run again: delete the folder to retry it) or `checkpoints/last.ckpt` without
either (stopped or killed: resumed from there). A signal (SIGTERM, Ctrl-C) stops the whole sweep after the job
in flight has saved; the report is written and the exit message says how to resume.
"""

from __future__ import annotations

import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from efficia.errors import EfficiaError, Stopped
from efficia.training.resume import APPLIED_ON_RESUME, MARKER
from efficia.training.sweep import FAILED, RECORD, write_report


def job_state(job_dir: Path) -> str:
    """finished | failed | stopped (a checkpoint to resume from) | new."""
    if (job_dir / RECORD).is_file():
        return "finished"
    if (job_dir / FAILED).is_file():
        return "failed"
    if (job_dir / "checkpoints" / "last.ckpt").is_file():
        return "stopped"
    return "new"


def recorded_metric(job_dir: Path, metric: str) -> float | None:
    """The metric a finished job returned (its last validation), for the sweeper."""
    record = json.loads((job_dir / RECORD).read_text())
    key = metric.removeprefix("val/")
    scored = [v for v in record.get("val", []) if key in v]
    return float(scored[-1][key]) if scored else None


def started_with(job_dir: Path) -> list[str] | None:
    """The overrides the run in job_dir was started with (Hydra's copy, kept aside when the run claimed the
    folder, or the failure record's), None where the folder holds none."""
    kept = job_dir / MARKER / "hydra" / "overrides.yaml"
    if kept.is_file():
        return list(yaml.safe_load(kept.read_text()) or [])
    if (job_dir / FAILED).is_file():
        return json.loads((job_dir / FAILED).read_text()).get("overrides")
    return None


def defining(overrides: list[str]) -> set[str]:
    """The overrides that make a run what it is: those a resume may change (trainer.* and the like, and a choice
    in their groups, such as logger=csv) are left out."""
    return {o for o in overrides if not (o.split("=", 1)[0].lstrip("+~") + ".").startswith(APPLIED_ON_RESUME)}


def sweep_resume_command(sweep_dir: str) -> str:
    """This sweep's own command line, pointed at its folder."""
    args = [a for a in sys.argv[1:] if not a.startswith("hydra.sweep.dir=")]
    return shlex.join(["python", "train.py", *args, f"hydra.sweep.dir={sweep_dir}"])


def run_job(train: Any, cfg: DictConfig) -> float | None:
    """`train(cfg)` as one job of a sweep. Returns the job's `optimized_metric`, or None when it failed."""
    hydra = HydraConfig.get()
    job_dir, sweep_dir = Path(cfg.output_dir), str(hydra.sweep.dir)
    name = " ".join(hydra.overrides.task) or "(no overrides)"
    state = job_state(job_dir)
    before = started_with(job_dir) if state != "new" else None
    if before is not None and defining(before) != defining(list(hydra.overrides.task)):
        print(f"error: job {hydra.job.num}'s folder {job_dir} holds a run of other overrides ({' '.join(before)}); "
              "a sweep run again into its folder must repeat its command; give a new hydra.sweep.dir for a new "
              "sweep", file=sys.stderr)
        sys.exit(2)
    if state == "finished":
        print(f"job {hydra.job.num} ({name}): finished earlier, skipped ({job_dir / RECORD})")
        return recorded_metric(job_dir, cfg.optimized_metric)
    if state == "failed":
        error = json.loads((job_dir / FAILED).read_text())["error"]
        print(f"job {hydra.job.num} ({name}): failed earlier, skipped (delete {job_dir} to retry it): {error}")
        return None
    if state == "stopped" and cfg.get("ckpt_path") is None:
        with open_dict(cfg):
            cfg.ckpt_path = str(job_dir / "checkpoints" / "last.ckpt")
        print(f"job {hydra.job.num} ({name}): resuming from {cfg.ckpt_path}")
    try:
        result = train(cfg)
    except Stopped as err:
        write_report(sweep_dir)
        print(f"error: {err}\nThe sweep stopped at job {hydra.job.num} ({name}); its report: {sweep_dir}/summary.md. "
              f"Resume the whole sweep (finished jobs are skipped, this one resumes from its checkpoint): "
              f"{sweep_resume_command(sweep_dir)}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:  # noqa: BLE001 - one job's failure, whatever it is, must not end the others
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not isinstance(err, EfficiaError):  # a bug: keep its trace in the log
            traceback.print_exc()
            line = f"{type(err).__name__}: {line}"
        record_failure(job_dir, line, list(hydra.overrides.task))
        print(f"error: job {hydra.job.num} ({name}) failed: {line}; the sweep goes on", file=sys.stderr)
        return None
    return result["metrics"].get(cfg.optimized_metric)


def record_failure(job_dir: Path, line: str, overrides: list[str]) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / (FAILED + ".tmp")
    tmp.write_text(json.dumps({"error": line, "overrides": overrides}))
    tmp.replace(job_dir / FAILED)
