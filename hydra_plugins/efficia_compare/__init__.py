"""`hydra/sweeper=compare`: the comparison protocol as a Hydra sweeper (efficia.training.compare).

The basic sweeper's grid (its `params` and the command line's sweeps, e.g. `model=glob(*)`) gives the groups to
compare; each group runs in two stages through the configured launcher: stage 1 over `optimizer.lr` times
each of `lr_factors` with the first seed, stage 2 at the group's best rate with the other seeds. Every job is
an ordinary run in its own folder (name: its overrides), so running the same command into the same
`hydra.sweep.dir` again skips the jobs that finished and resumes a stopped one (efficia.training.multirun).
Lives in `hydra_plugins` because Hydra instantiates sweepers from there only; it imports efficia lazily, since
Hydra imports every plugin module at start-up.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException


class ComparisonSweeper(BasicSweeper):
    def __init__(self, params: dict[str, str] | None = None, lr_factors: list[float] | None = None,
                 seeds: int = 3, metric: str = "val/loss", mode: str = "min", at: str = "final",
                 max_batch_size: int | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        from efficia.training.compare import RECORDED_METRICS, Protocol

        if mode not in ("min", "max") or at not in ("final", "best") or int(seeds) < 1 or not lr_factors:
            raise HydraException(f"hydra.sweeper: mode={mode} (min|max), at={at} (final|best), seeds={seeds} (>= 1) "
                                 f"and lr_factors={lr_factors} (a non-empty list) must all be valid")
        if not RECORDED_METRICS.fullmatch(metric):
            raise HydraException(f"hydra.sweeper.metric={metric} is not recorded by a run: use val/loss, val/bpb, "
                                 "val/recall_acc or one data.test setting's val/recall_acc/<seq_len>x<pairs>")
        self.protocol = Protocol(metric, mode, at, tuple(float(f) for f in lr_factors), int(seeds))

    def sweep(self, arguments: list[str]) -> Any:
        from efficia.training.compare import best_rates, stage_one, stage_two, write_comparison

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        taken = [o.get_key_element() for o in overrides if o.get_key_element() in ("optimizer.lr", "seed")]
        if taken:
            raise HydraException(f"the comparison chooses {' and '.join(taken)} itself; set the recipe's rate and "
                                 "seed in the config, the grid with hydra.sweeper.lr_factors and the number of seeds "
                                 "with hydra.sweeper.seeds")
        groups = [job for batch in self.split_arguments(overrides, None) for job in batch]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from omegaconf import OmegaConf

        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        lr, seed = float(self.config.optimizer.lr), int(self.config.seed)
        first = stage_one(groups, lr, seed, self.protocol)
        returns = [self.launch(first, 0)]
        best = best_rates(groups, sweep_dir, self.protocol, seed)
        second = stage_two(groups, best, seed, self.protocol.seeds)
        if second:
            returns.append(self.launch(second, len(first)))
        md = write_comparison(sweep_dir, self.protocol)
        print(f"comparison report: {md} (+ compare.csv, compare_rates.png, compare_curves.png)")
        missing = [" ".join(g) for g, lr in zip(groups, best, strict=True) if lr is None]
        if missing:  # every rate of these failed or diverged: nothing to compare
            print(f"error: no rate of {'; '.join(missing)} finished with a finite {self.protocol.metric}; see {md}",
                  file=sys.stderr)
            sys.exit(1)
        return returns

    def launch(self, jobs: list[list[str]], first_index: int) -> Any:
        self.validate_batch_is_legal(jobs)
        return self.launcher.launch(jobs, initial_job_idx=first_index)
