"""Train any registered model: `python train.py [model=gpt] [scale=small] [trainer=cpu] ...`.

`python train.py --help` lists the config groups; `-m` sweeps (one W&B run per job).
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from efficia.cli import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.plan:  # plan=true: the GPU plan (python -m efficia.plan), nothing trained
        from efficia.plan.command import plan_from_hydra

        run_cli(plan_from_hydra, cfg)
        return None
    from efficia.training.run import train  # here, so --help and a refused override do not load Lightning

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a failed job is recorded and the sweep goes on
        from efficia.training.multirun import run_job

        return run_job(train, cfg)
    return run_cli(train, cfg)["metrics"].get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
