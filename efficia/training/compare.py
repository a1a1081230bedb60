"""The comparison protocol: every model at its own best learning rate, over several seeds, at a stated budget.

Stage 1 trains each group (a model, or a model at one data setting: every override but `optimizer.lr` and
`seed`) over a grid of learning rates with the first seed; stage 2 trains the group's best rate with the other
seeds. Hydra runs both (hydra_plugins/efficia_compare, `hydra/sweeper=compare`); this module reads the jobs'
records (efficia.training.sweep) and decides: the best rate per group, whether it sits at the edge of the grid,
the metric's spread over seeds, and a ranking that orders two groups only where their seed ranges do not overlap.
It writes `compare.md`, `compare.csv`, `compare_rates.png` and `compare_curves.png` in the sweep folder.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from efficia.training.sweep import collect, fmt, save_with_legend

VARIED_BY_PROTOCOL = ("optimizer.lr", "seed")


@dataclass(frozen=True)
class Protocol:
    """What is compared and how (conf/hydra/sweeper/compare.yaml): the validation metric (`val/loss`,
    `val/recall_acc`, ...), whether lower or higher is better (`min`/`max`), which validation counts (the last
    one, at the end of the budget, or the best one), stage 1's grid as factors of the recipe's rate, and seeds."""

    metric: str
    mode: str
    at: str
    lr_factors: tuple[float, ...]
    seeds: int

    def better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b


def comparison_of(sweep_dir: Path) -> Protocol | None:
    """The protocol of a comparison's sweep folder (its multirun.yaml names the compare sweeper), else None."""
    saved = sweep_dir / "multirun.yaml"
    if not saved.is_file():
        return None
    sweeper = (yaml.safe_load(saved.read_text()).get("hydra") or {}).get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("ComparisonSweeper"):
        return None
    return Protocol(sweeper["metric"], sweeper["mode"], sweeper["at"], tuple(sweeper["lr_factors"]),
                    int(sweeper["seeds"]))


@dataclass
class Job:
    group: tuple[str, ...]    # its overrides but the rate and the seed
    lr: float
    seed: int
    value: float | None       # the metric; None: failed or unfinished; nan: diverged
    status: str
    row: dict[str, Any]


@dataclass
class Result:
    """One group's outcome: stage 1's rate curve, the chosen rate, and the seeds at that rate."""

    group: tuple[str, ...]
    rates: dict[float, Job]                        # stage 1 (first seed), by rate
    best_lr: float | None = None
    edge: str | None = None                        # "lowest" / "highest": the best rate is the grid's end
    seeds: list[Job] = field(default_factory=list)  # the best rate's finished jobs, every seed

    def values(self) -> list[float]:
        return [j.value for j in self.seeds if j.value is not None and math.isfinite(j.value)]


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float      # sample standard deviation (n - 1); 0 for one seed
    low: float
    high: float
    n: int


RECORDED_METRICS = re.compile(r"val/(loss|bpb|recall_acc(/\d+x\d+)?)")  # what a validation record holds


def recorded(validation: Mapping[str, Any], metric: str) -> float | None:
    """One validation's metric: `val/loss`, `val/bpb`, `val/recall_acc`, or one test setting's
    `val/recall_acc/<T>x<P>` (kept under the record's `recall`)."""
    key = metric.removeprefix("val/")
    value = (validation.get("recall") or {}).get(key.split("/", 1)[1]) if "/" in key else validation.get(key)
    return None if value is None else float(value)


def metric_value(val: Sequence[Mapping[str, Any]], protocol: Protocol) -> float | None:
    """The job's metric from its validations (nan if it is not finite there: diverged)."""
    scored = [v for v in (recorded(entry, protocol.metric) for entry in val) if v is not None]
    if not scored:
        return None
    if protocol.at == "final":
        return scored[-1]
    finite = [s for s in scored if math.isfinite(s)]
    return (min(finite) if protocol.mode == "min" else max(finite)) if finite else math.nan


def parse_jobs(rows: Iterable[Mapping[str, Any]], protocol: Protocol) -> list[Job]:
    """Jobs that carry a rate and a seed in their overrides (the protocol's own); other jobs are ignored."""
    jobs = []
    for row in rows:
        settings = dict(o.split("=", 1) for o in row["override_list"] if "=" in o)
        if not all(k in settings for k in VARIED_BY_PROTOCOL):
            continue
        group = tuple(sorted(o for o in row["override_list"] if o.split("=", 1)[0] not in VARIED_BY_PROTOCOL))
        value = metric_value(row["val"], protocol)  # None without a record: failed, running or stopped
        jobs.append(Job(group, float(settings["optimizer.lr"]), int(settings["seed"]), value, row["status"], dict(row)))
    return jobs


def choose(jobs: Sequence[Job], protocol: Protocol, first_seed: int) -> list[Result]:
    """Per group, in the order groups first appear: the best rate among stage 1's finished, finite jobs (a tie
    goes to the lower rate), the edge flag, and every seed's job at that rate."""
    results: dict[tuple[str, ...], Result] = {}
    for job in jobs:
        result = results.setdefault(job.group, Result(job.group, {}))
        if job.seed == first_seed:
            result.rates[job.lr] = job
    for result in results.values():
        scored = [j for j in result.rates.values() if j.value is not None and math.isfinite(j.value)]
        if not scored:
            continue
        sign = 1.0 if protocol.mode == "min" else -1.0
        best = min(scored, key=lambda j: (sign * j.value, j.lr))
        result.best_lr = best.lr
        # the rates known: finished (diverged included) or failed; a job still running or stopped is not known worse
        tried = sorted(lr for lr, j in result.rates.items() if j.value is not None or j.status.startswith("failed"))
        if len(tried) > 1 and best.lr == tried[0]:
            result.edge = "lowest"
        elif len(tried) > 1 and best.lr == tried[-1]:
            result.edge = "highest"
        result.seeds = sorted((j for j in jobs if j.group == result.group and j.lr == best.lr), key=lambda j: j.seed)
    return list(results.values())


def rate_grid(lr: float, factors: Sequence[float]) -> list[str]:
    """The stage-1 rates as override values: the recipe's rate times each factor, to 3 significant digits."""
    return sorted({f"{lr * f:.3g}" for f in factors}, key=float)


def stage_one(groups: Sequence[Sequence[str]], lr: float, seed: int, protocol: Protocol) -> list[list[str]]:
    return [[*g, f"optimizer.lr={rate}", f"seed={seed}"] for g in groups for rate in rate_grid(lr, protocol.lr_factors)]


def best_rates(groups: Sequence[Sequence[str]], sweep_dir: Path, protocol: Protocol, seed: int) -> list[float | None]:
    """Each group's best rate from the records stage 1 left (None: no rate finished with a finite metric)."""
    best = {r.group: r.best_lr for r in choose(parse_jobs(collect(sweep_dir), protocol), protocol, seed)}
    return [best.get(tuple(sorted(g))) for g in groups]


def stage_two(groups: Sequence[Sequence[str]], best: Sequence[float | None], seed: int, seeds: int) -> list[list[str]]:
    """Each group's best rate with seeds seed+1 ... seed+seeds-1."""
    return [[*g, f"optimizer.lr={lr:.3g}", f"seed={seed + i}"]
            for g, lr in zip(groups, best, strict=True) if lr is not None for i in range(1, seeds)]


def seed_stats(values: Sequence[float]) -> Stats | None:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stats(statistics.fmean(values), std, min(values), max(values), len(values))


def rank(stats: Mapping[tuple[str, ...], Stats], protocol: Protocol) -> dict[tuple[str, ...], tuple[int, int]]:
    """Each group's possible ranks (best, worst): it is behind every group whose whole seed range is better than
    its own and ahead of every group whose whole range is worse; groups whose ranges overlap are not ordered."""
    def strictly_better(a: Stats, b: Stats) -> bool:  # every seed of a beats every seed of b
        return a.high < b.low if protocol.mode == "min" else a.low > b.high

    out = {}
    for g, s in stats.items():
        ahead = sum(strictly_better(o, s) for h, o in stats.items() if h != g)
        behind = sum(strictly_better(s, o) for h, o in stats.items() if h != g)
        out[g] = (1 + ahead, len(stats) - behind)
    return out


def label(group: Sequence[str], common: set[str]) -> str:
    return " ".join(o for o in group if o not in common) or " ".join(group) or "(no overrides)"


def write_comparison(sweep_dir: str | Path, protocol: Protocol) -> Path | None:
    """compare.md / compare.csv / compare_rates.png / compare_curves.png from the jobs under sweep_dir."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    jobs = parse_jobs(rows, protocol)
    if not jobs:
        return None
    first_seed = most_common_first_seed(jobs)
    results = choose(jobs, protocol, first_seed)
    common = set.intersection(*(set(r.group) for r in results))
    stats = {r.group: s for r in results if (s := seed_stats(r.values())) is not None}
    ranks = rank(stats, protocol)
    ordered = sorted(results, key=lambda r: (r.group not in stats,
                                             (1 if protocol.mode == "min" else -1) * stats[r.group].mean
                                             if r.group in stats else 0.0))
    budgets = sorted({j.row.get("budget") for j in jobs if j.row.get("budget")})
    write_csv(sweep_dir / "compare.csv", ordered, stats, ranks, common)
    plot_rates(results, protocol, common, sweep_dir / "compare_rates.png")
    plot_curves(results, protocol, common, sweep_dir / "compare_curves.png")
    md = sweep_dir / "compare.md"
    md.write_text(markdown(ordered, stats, ranks, protocol, common, budgets, first_seed, sweep_dir))
    return md


def most_common_first_seed(jobs: Sequence[Job]) -> int:
    """Stage 1's seed: the one every rate of the grid was run with."""
    counts: dict[int, int] = {}
    for j in jobs:
        counts[j.seed] = counts.get(j.seed, 0) + 1
    return max(counts, key=lambda s: (counts[s], -s))


def write_csv(path: Path, ordered: Sequence[Result], stats: Mapping, ranks: Mapping, common: set[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "rank_best", "rank_worst", "best_lr", "edge", "mean", "std", "min", "max", "seeds",
                         *(f"lr={lr:g}" for lr in all_rates(ordered))])
        for r in ordered:
            s, (lo, hi) = stats.get(r.group), ranks.get(r.group, (None, None))
            writer.writerow([label(r.group, common), lo, hi, r.best_lr, r.edge or "",
                             *((s.mean, s.std, s.low, s.high, s.n) if s else ("",) * 5),
                             *(r.rates[lr].value if lr in r.rates and r.rates[lr].value is not None else ""
                               for lr in all_rates(ordered))])


def all_rates(results: Sequence[Result]) -> list[float]:
    return sorted({lr for r in results for lr in r.rates})


def rate_cell(job: Job | None, best: bool) -> str:
    if job is None:
        return ""
    if job.value is None:
        return "failed" if job.status.startswith("failed") else "not finished"
    if not math.isfinite(job.value):
        return "diverged"
    return f"**{job.value:.4f}**" if best else f"{job.value:.4f}"


def markdown(ordered: Sequence[Result], stats: Mapping, ranks: Mapping, protocol: Protocol, common: set[str],
             budgets: Sequence[str], first_seed: int, sweep_dir: Path) -> str:
    better = "lower" if protocol.mode == "min" else "higher"
    metric = f"{protocol.metric} ({'last' if protocol.at == 'final' else 'best'} validation, {better} is better)"
    lines = [f"# Comparison {sweep_dir}", "",
             f"Every job: `{' '.join(sorted(common)) or '(no overrides)'}`; "
             f"budget: {'; '.join(budgets) or 'not recorded'}.", "",
             f"Metric: {metric}. Stage 1: each group over the learning-rate grid with seed {first_seed}; stage 2: "
             "its best rate with the other seeds. Rank: the places a group can take given its seed range "
             "(min-max); groups whose ranges overlap are not ordered (`1-2`).", "",
             "| rank | group | best lr | mean ± std | min-max | seeds | flag |", "|---|---|---|---|---|---|---|"]
    for r in ordered:
        s = stats.get(r.group)
        lo, hi = ranks.get(r.group, (None, None))
        place = "" if lo is None else (str(lo) if lo == hi else f"{lo}-{hi}")
        running = [lr for lr, j in r.rates.items() if j.value is None and not j.status.startswith("failed")]
        flag = ("stage 1 not finished" if running else f"best rate is the grid's {r.edge}: widen it" if r.edge
                else "no finished rate" if s is None else "")
        lines.append("| " + " | ".join([
            place, f"`{label(r.group, common)}`", fmt(r.best_lr, "g"),
            (f"{s.mean:.4f} ± {s.std:.4f}" if s.n > 1 else f"{s.mean:.4f} (one seed)") if s else "",
            f"{s.low:.4f}-{s.high:.4f}" if s else "",
            str(s.n) if s else "0", flag]) + " |")
    rates = all_rates(ordered)
    lines += ["", f"Stage 1, {protocol.metric} per learning rate (seed {first_seed}; bold: the chosen rate):", "",
              "| group | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
    for r in ordered:
        lines.append(f"| `{label(r.group, common)}` | "
                     + " | ".join(rate_cell(r.rates.get(lr), lr == r.best_lr) for lr in rates) + " |")
    lines += ["", "Seeds at the chosen rate:", "", "| group | seed | metric | steps | tokens (M) | training FLOPs "
              "| CPU s | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in ordered:
        for j in r.seeds:
            row = j.row
            lines.append("| " + " | ".join([
                f"`{label(r.group, common)}`", str(j.seed), rate_cell(j, False), fmt(row.get("steps"), "d"),
                fmt(row.get("tokens"), ".3f", 1e6), fmt(row.get("flops"), ".3g"), fmt(row.get("cpu_s"), ".0f"),
                fmt(row.get("wall_s"), ".0f")]) + " |")
    lines += ["", "![metric against learning rate, stage 1](compare_rates.png)", "",
              "![validation curves at the chosen rate: mean over seeds, band = min-max](compare_curves.png)", ""]
    return "\n".join(lines)


def plot_rates(results: Sequence[Result], protocol: Protocol, common: set[str], path: Path) -> None:
    """Zoology's picture: the metric against the learning rate per group, the chosen rate's seed range as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        points = sorted((lr, j.value) for lr, j in r.rates.items() if j.value is not None and math.isfinite(j.value))
        if not points:
            continue
        (line,) = ax.plot(*zip(*points, strict=True), "o-", markersize=4, label=label(r.group, common))
        s = seed_stats(r.values())
        if s is not None and r.best_lr is not None and s.n > 1:
            ax.errorbar([r.best_lr], [s.mean], yerr=[[s.mean - s.low], [s.high - s.mean]], color=line.get_color(),
                        capsize=4, marker="*", markersize=10)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optimizer.lr)")
    ax.set_ylabel(protocol.metric)
    ax.grid(alpha=0.3, which="both")
    save_with_legend(fig, ax, path)


def plot_curves(results: Sequence[Result], protocol: Protocol, common: set[str], path: Path) -> None:
    """Validation curves at each group's chosen rate against steps and training FLOPs: the mean over seeds and
    a min-max band (validations aligned by their order; the shortest seed's count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = protocol.metric.removeprefix("val/")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for r in results:
        curves = [[v for v in j.row["val"] if key in v] for j in r.seeds if j.value is not None]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        ys = [[c[i][key] for c in curves] for i in range(n)]
        mean = [statistics.fmean(y) for y in ys]
        fpt = r.seeds[0].row.get("flops_per_token") or math.nan
        for ax, xs in ((axes[0], [statistics.fmean(c[i]["step"] for c in curves) for i in range(n)]),
                       (axes[1], [fpt * statistics.fmean(c[i]["tokens"] for c in curves) for i in range(n)])):
            seeds = f"{len(curves)} seed{'s' * (len(curves) != 1)}"
            (line,) = ax.plot(xs, mean, "-", label=f"{label(r.group, common)} (lr {r.best_lr:g}, {seeds})")
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training FLOPs")
    axes[0].set_ylabel(protocol.metric)
    for ax in axes:
        ax.grid(alpha=0.3)
    save_with_legend(fig, axes[0], path)
