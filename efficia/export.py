"""`python -m efficia.export ckpt=<run>.ckpt out=<dir> [overwrite=true]`: a checkpoint as a pretrained
folder (config.json, tokenizer.json, model.safetensors) that `efficia.from_pretrained` and
`python sample.py ckpt=<dir>` read. See efficia/pretrained.py."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from efficia.cli import run_cli
from efficia.errors import ConfigError

USAGE = "usage: python -m efficia.export ckpt=<path to .ckpt> out=<folder> [overwrite=true]"


def export(cfg: DictConfig) -> str:
    from efficia.pretrained import save_pretrained

    unknown = sorted(set(cfg) - {"ckpt", "out", "overwrite"})
    missing = [k for k in ("ckpt", "out") if cfg.get(k) in (None, "")]
    if unknown or missing:
        what = f"unknown option(s) {', '.join(unknown)}" if unknown else f"missing {' and '.join(missing)}"
        raise ConfigError(f"{what}; {USAGE}")
    out = save_pretrained(str(cfg.ckpt), str(cfg.out), overwrite=bool(cfg.get("overwrite", False)))
    print(f"exported {cfg.ckpt} -> {out} (config.json, tokenizer.json, model.safetensors)\n"
          f"sample: python sample.py ckpt={out}\n"
          f"python: efficia.from_pretrained({str(out)!r})")
    return str(out)


def main(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = OmegaConf.from_dotlist(args)
    except Exception as err:  # omegaconf's grammar errors come in several classes
        print(f"error: cannot parse {' '.join(args)!r} ({type(err).__name__}); {USAGE}", file=sys.stderr)
        sys.exit(2)
    return run_cli(export, cfg)


if __name__ == "__main__":
    main()
