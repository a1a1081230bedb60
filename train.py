"""Train any registered model: `python train.py [model=gpt] [scale=small] [trainer=cpu] ...`.

`python train.py --help` lists the config groups; `-m` sweeps (one W&B run per job).
"""

import hydra
from omegaconf import DictConfig

from efficia.cli import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.plan:  # plan=true: the GPU plan (python -m efficia.plan), nothing trained
        from efficia.plan.command import plan_from_hydra

        run_cli(plan_from_hydra, cfg)
        return None
    from efficia.training.run import train  # here, so --help and a refused override do not load Lightning

    result = run_cli(train, cfg)
    value = result["metrics"].get(cfg.optimized_metric)
    return value


if __name__ == "__main__":
    main()
