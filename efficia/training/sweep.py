"""Sweeps: each job records itself (RunRecord), the sweep writes one comparison report (SweepReport).

A job's record is `<job dir>/run_record.json`: parameters, decoding-cache bytes, token budget, wall time,
training tokens/s and every validation (step, tokens seen, wall time, loss, bpb, and on recall data the
answer accuracy overall and per test setting). The report reads the records of every job under a sweep
directory and writes `summary.csv`, `summary.md` and `summary.png` there (plus `recall.png`, accuracy
against the test settings' seq_len and num_kv_pairs per job, when jobs measured recall), after each job
(so an interrupted or failed sweep still has one) and at the end of the sweep.
`python -m efficia.sweep dir=<sweep dir>` (efficia/sweep.py) rebuilds it by hand.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from efficia.training.budget import describe_budget
from efficia.training.module import TrainingModule
from efficia.training.throughput import run_flops_per_token

RECORD = "run_record.json"
FAILED = "job_failed.json"  # written by efficia.training.multirun for a job that failed
RECALL = "val/recall_acc"
CACHE_LENGTHS = (1024, 8192)  # decoding-cache bytes are reported at these sequence lengths


class RunRecord(Callback):
    """Writes the job's record at the end of fit and puts its headline numbers in the W&B run summary.

    Its history and elapsed time are part of the checkpoint, so a resumed run records its whole curve.
    """

    def __init__(self, dirpath: str) -> None:
        self.path = Path(dirpath) / RECORD
        self.val: list[dict[str, float]] = []
        self.prior_wall_s = 0.0     # fit time of earlier sessions of this run (resume)
        self.train_tokens = 0       # tokens in timed training intervals (batch end to batch end)
        self.train_s = 0.0
        self.fit_start: float | None = None
        self.cpu_start = 0.0         # process CPU seconds at fit start: on a shared machine, what the run itself used
        self.prior_cpu_s = 0.0
        self.last_end: float | None = None
        self.flops_per_token = math.nan

    def wall_s(self) -> float:
        return self.prior_wall_s + (time.perf_counter() - self.fit_start if self.fit_start is not None else 0.0)

    def cpu_s(self) -> float:
        return self.prior_cpu_s + time.process_time() - self.cpu_start

    def on_fit_start(self, trainer: L.Trainer, pl_module: TrainingModule) -> None:
        self.fit_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.flops_per_token, _ = run_flops_per_token(pl_module.cfg, pl_module.tokenizer.vocab_size)
        update_wandb_summary(trainer, static_facts(pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: TrainingModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self.last_end is not None:  # the first batch after a start or a validation is not timed
            self.train_s += now - self.last_end
            self.train_tokens += batch[0].numel() * trainer.world_size
        self.last_end = now

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: TrainingModule) -> None:
        if trainer.sanity_checking:
            return
        tokens = float(pl_module.tokens_seen)
        pl_module.log("val/tokens", tokens)  # lets a W&B panel plot val/loss against tokens seen

    def on_validation_end(self, trainer: L.Trainer, pl_module: TrainingModule) -> None:
        self.last_end = None
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        m = trainer.callback_metrics
        entry = {"step": trainer.global_step, "tokens": float(pl_module.tokens_seen),
                 "wall_s": self.wall_s(), "cpu_s": self.cpu_s(), "time": time.time(), "loss": float(m["val/loss"]),
                 "bpb": float(m["val/bpb"]) if "val/bpb" in m else math.nan}
        if RECALL in m:  # recall data: the answers' accuracy, overall and per test setting (`<T>x<P>`)
            entry["recall_acc"] = float(m[RECALL])
            entry["recall"] = {k.removeprefix(RECALL + "/"): float(v) for k, v in m.items()
                               if k.startswith(RECALL + "/")}
        self.val.append(entry)

    def on_fit_end(self, trainer: L.Trainer, pl_module: TrainingModule) -> None:
        record = {**static_facts(pl_module), **self.summary(trainer, pl_module), "val": self.val}
        update_wandb_summary(trainer, {k: v for k, v in record.items() if k != "val"})
        self.write(record)

    def summary(self, trainer: L.Trainer, pl_module: TrainingModule) -> dict[str, Any]:
        best = min(self.val, key=lambda v: v["loss"]) if self.val else None
        last = self.val[-1] if self.val else None
        return {
            "steps": trainer.global_step,
            "tokens": float(pl_module.tokens_seen),
            "flops_per_token": self.flops_per_token,  # forward + backward, counted (efficia.training.throughput)
            "flops": self.flops_per_token * float(pl_module.tokens_seen),
            "wall_s": self.wall_s(),
            "cpu_s": self.cpu_s(),
            "tokens_per_s": self.train_tokens / self.train_s if self.train_s > 0 else math.nan,
            "best_val_loss": best["loss"] if best else math.nan,
            "best_val_bpb": best["bpb"] if best else math.nan,  # bpb at the best-loss validation
            "best_val_step": best["step"] if best else None,
            "final_val_loss": last["loss"] if last else math.nan,
            "final_val_bpb": last["bpb"] if last else math.nan,
            **recall_summary(self.val),
        }

    @rank_zero_only
    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.path)  # a reader never sees half a record

    def state_dict(self) -> dict[str, Any]:
        return {"val": self.val, "wall_s": self.wall_s(), "cpu_s": self.cpu_s()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val = list(state_dict.get("val", []))
        self.prior_wall_s = float(state_dict.get("wall_s", 0.0))
        self.prior_cpu_s = float(state_dict.get("cpu_s", 0.0))


def recall_summary(val: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best answer accuracy, and the final one per test setting (`recall_acc/<T>x<P>`)."""
    scored = [v for v in val if "recall_acc" in v]
    if not scored:
        return {}
    last = scored[-1]
    return {"final_recall_acc": last["recall_acc"], "best_recall_acc": max(v["recall_acc"] for v in scored),
            **{f"recall_acc/{name}": acc for name, acc in last["recall"].items()}}


def static_facts(pl_module: TrainingModule) -> dict[str, Any]:
    """What the architecture costs, independent of training: parameters and decoding-cache bytes."""
    net = pl_module.net
    return {"model": pl_module.cfg["model"]["name"], "params": net.num_params(),
            **{f"cache_bytes@{n}": net.cache_bytes(n) for n in CACHE_LENGTHS}}


@rank_zero_only
def update_wandb_summary(trainer: L.Trainer, values: dict[str, Any]) -> None:
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update(values)


# -- the sweep report -----------------------------------------------------------------------------

COLUMNS = ["job", "overrides", "model", "params", "steps", "tokens", "flops", "best_val_loss", "best_val_bpb",
           "final_val_loss", "final_val_bpb", "wall_s", "cpu_s", "tokens_per_s",
           *(f"cache_bytes@{n}" for n in CACHE_LENGTHS), "final_recall_acc", "best_recall_acc", "status"]


def setting_columns(rows: list[dict[str, Any]]) -> list[str]:
    """`recall_acc/<T>x<P>` columns of every job, ordered by seq_len then pairs."""
    names = {k for r in rows for k in r if k.startswith("recall_acc/")}
    return sorted(names, key=lambda k: tuple(int(n) for n in k.removeprefix("recall_acc/").split("x")))


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job directory of a sweep (the ones Hydra wrote `.hydra/overrides.yaml` into), in job order."""
    def key(d: Path) -> tuple:
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in d.relative_to(sweep_dir).parts)

    return sorted((p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")), key=key)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job: its overrides and its record, or a status saying why it has none."""
    rows = []
    for d in job_dirs(sweep_dir):
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or []
        row: dict[str, Any] = {"job": str(d.relative_to(sweep_dir)), "overrides": " ".join(overrides),
                               "override_list": overrides}
        record_path = d / RECORD
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            row.update({k: v for k, v in record.items()
                        if k in COLUMNS or k == "flops_per_token" or k.startswith("recall_acc/")})
            row["status"] = "done"
            row["val"] = record.get("val", [])
        elif (d / FAILED).is_file():
            row["status"] = "failed: " + json.loads((d / FAILED).read_text())["error"]
            row["val"] = []
        else:
            row["status"] = "no record: running, stopped, or run without callbacks.run_record"
            row["val"] = []
        config = d / ".hydra" / "config.yaml"
        row["budget"] = describe_budget(yaml.safe_load(config.read_text())) if config.is_file() else None
        rows.append(row)
    common = set.intersection(*(set(r["override_list"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:  # what tells this job from the others (the table and the plot legend show only this)
        r["varies"] = " ".join(o for o in r["override_list"] if o not in common)
    return rows


def common_overrides(rows: list[dict[str, Any]]) -> list[str]:
    varies = {o for r in rows for o in r["varies"].split()}
    return [o for o in rows[0]["override_list"] if o not in varies] if rows else []


def write_report(sweep_dir: str | Path) -> Path | None:
    """summary.csv (job order), summary.md (ranked by best val loss) and summary.png in the sweep dir."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        return None
    columns = COLUMNS[:-1] + setting_columns(rows) + COLUMNS[-1:]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, sweep_dir / "summary.png")
    if setting_columns(rows):
        plot_recall(rows, sweep_dir / "recall.png")
    md = sweep_dir / "summary.md"
    md.write_text(markdown(rows, sweep_dir))
    return md


def fmt(value: Any, spec: str, scale: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value / scale if scale else value, spec)


def markdown(rows: list[dict[str, Any]], sweep_dir: Path) -> str:
    ranked = sorted(rows, key=lambda r: (r["status"] != "done", r.get("best_val_loss") or math.inf))
    cache = [f"cache KiB @{n}" for n in CACHE_LENGTHS]
    common = " ".join(common_overrides(rows))
    lines = [f"# Sweep {sweep_dir}", "", f"Every job: `{common or '(no overrides)'}`.", "",
             f"{len(rows)} job{'s' * (len(rows) != 1)}, ranked by best val loss (nats/token); bpb at that validation. "
             "Wall time is the whole fit (validation included); tokens/s is training only; "
             "cache = decoding-cache bytes for one sequence of that length.", "",
             "| job | its overrides | params (M) | steps | tokens (M) | best val loss | best val bpb | final val loss "
             f"| wall s | train tokens/s | {' | '.join(cache)} | status |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(cache) + "---|"]
    for r in ranked:
        cells = [r["job"], f"`{r['varies']}`" if r["varies"] else "", fmt(r.get("params"), ".3f", 1e6),
                 fmt(r.get("steps"), "d"), fmt(r.get("tokens"), ".3f", 1e6), fmt(r.get("best_val_loss"), ".4f"),
                 fmt(r.get("best_val_bpb"), ".4f"), fmt(r.get("final_val_loss"), ".4f"), fmt(r.get("wall_s"), ".0f"),
                 fmt(r.get("tokens_per_s"), ",.0f"),
                 *(fmt(r.get(f"cache_bytes@{n}"), ",.0f", 1024) for n in CACHE_LENGTHS),
                 r["status"].replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![val loss against steps, tokens and wall time](summary.png)", ""]
    if setting_columns(rows):
        lines += recall_markdown(rows)
    return "\n".join(lines)


def recall_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Answer accuracy of the final weights per test setting (seq_len x pairs), best first."""
    settings = setting_columns(rows)
    ranked = sorted(rows, key=lambda r: -(r.get("final_recall_acc") or -1))
    lines = ["## Recall: answer accuracy of the final weights", "",
             "| job | its overrides | overall | best overall | "
             + " | ".join(s.removeprefix("recall_acc/") for s in settings) + " |",
             "|---|---|---|---|" + "---|" * len(settings)]
    for r in ranked:
        cells = [r["job"], f"`{r['varies']}`" if r["varies"] else "", fmt(r.get("final_recall_acc"), ".3f"),
                 fmt(r.get("best_recall_acc"), ".3f"), *(fmt(r.get(s), ".3f") for s in settings)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![accuracy against seq_len and num_kv_pairs](recall.png)", ""]
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = (("step", "step", 1.0), ("tokens", "tokens seen (M)", 1e6), ("wall_s", "wall time (s)", 1.0))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for r in rows:
        if not r["val"]:
            continue
        label = f"{r['job']}: {r['varies']}" if r["varies"] else r["job"]
        for ax, (key, _, scale) in zip(axes, axes_spec, strict=True):
            ax.plot([v[key] / scale for v in r["val"]], [v["loss"] for v in r["val"]], "o-", markersize=3,
                    label=label)
    for ax, (_, xlabel, _) in zip(axes, axes_spec, strict=True):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val loss (nats/token)")
    save_with_legend(fig, axes[0], path)


def save_with_legend(fig: Any, legend_from: Any, path: Path) -> None:
    """One legend under the panels (from `legend_from`'s lines), then the PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    handles, labels = legend_from.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / 3) if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: accuracy against test seq_len (at the most common pair count); right: against pairs (at the most
    common seq_len). One line per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [tuple(int(n) for n in s.removeprefix("recall_acc/").split("x")) for s in setting_columns(rows)]
    common_p = max({p for _, p in settings}, key=lambda p: sum(q == p for _, q in settings))
    common_t = max({t for t, _ in settings}, key=lambda t: sum(u == t for u, _ in settings))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in rows:
        label = f"{r['job']}: {r['varies']}" if r["varies"] else r["job"]
        for ax, pick in ((axes[0], lambda t, p: (p == common_p, t)), (axes[1], lambda t, p: (t == common_t, p))):
            points = sorted((pick(t, p)[1], r[f"recall_acc/{t}x{p}"]) for t, p in settings
                            if pick(t, p)[0] and r.get(f"recall_acc/{t}x{p}") is not None)
            if points:
                ax.plot(*zip(*points, strict=True), "o-", markersize=4, label=label)
    axes[0].set_xlabel(f"test seq_len ({common_p} pairs)")
    axes[1].set_xlabel(f"test num_kv_pairs (seq_len {common_t})")
    axes[0].set_ylabel("answer accuracy")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    save_with_legend(fig, axes[0], path)


class SweepReport(HydraCallback):
    """Hydra callback (conf/train.yaml `hydra.callbacks`): rewrites the sweep's report after each job and at the end."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            write_report(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        md = write_report(config.hydra.sweep.dir)
        if md is not None:
            print(f"sweep report: {md} (+ summary.csv, summary.png)")
        if str(config.hydra.sweeper.get("_target_", "")).endswith("ComparisonSweeper"):
            return  # a comparison's failed or diverged rates are results, in compare.md
        rows = collect(Path(config.hydra.sweep.dir))
        failed = [r for r in rows if r["status"].startswith("failed")]
        if failed:  # the sweep ran every job; its exit status still says that some failed
            print(f"error: {len(failed)} of {len(rows)} jobs failed (their error lines are in {md}): "
                  + "; ".join(f"{r['job']}: {r['status'].removeprefix('failed: ')}" for r in failed[:3]),
                  file=sys.stderr)
            sys.exit(1)
