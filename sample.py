"""Sample from a checkpoint: `python sample.py ckpt=<path> prompt="ROMEO:" [temperature=0.8 top_k=...]`.

Text streams as it is generated; `interactive=true` asks for prompts in a loop.
"""

import hydra
from omegaconf import DictConfig

from efficia.cli import run_cli
from efficia.inference.sampling_cli import sample


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_cli(sample, cfg)


if __name__ == "__main__":
    main()
