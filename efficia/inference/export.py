"""python -m efficia.export ckpt=<run>.ckpt out=<dir> [overwrite=true] [format=efficia|hf] [remote_code=true|false]

A checkpoint as a pretrained folder that `efficia.from_pretrained` and `python sample.py ckpt=<dir>` read.
format=efficia (default): config.json, tokenizer.json, model.safetensors (efficia/inference/pretrained.py).
format=hf: a Hugging Face transformers folder, native class or remote code (efficia/inference/hf,
docs/hf-export.md). overwrite=true replaces an existing folder; remote_code=true forces remote code with format=hf,
false refuses it.
"""

from __future__ import annotations

import json
import sys

from omegaconf import DictConfig, OmegaConf

from efficia.cli import command_options, run_cli
from efficia.errors import ConfigError
from efficia.inference.hf import META

USAGE = ("usage: python -m efficia.export ckpt=<path to .ckpt> out=<folder> [overwrite=true] "
         "[format=efficia|hf] [remote_code=true|false]")
OPTIONS = {"ckpt": None, "out": None, "overwrite": False, "format": "efficia", "remote_code": None}


def export(cfg: DictConfig) -> str:
    from efficia.inference.pretrained import save_pretrained

    unknown = sorted(set(cfg) - {"ckpt", "out", "overwrite", "format", "remote_code"})
    missing = [k for k in ("ckpt", "out") if cfg.get(k) in (None, "")]
    if unknown or missing:
        what = f"unknown option(s) {', '.join(unknown)}" if unknown else f"missing {' and '.join(missing)}"
        raise ConfigError(f"{what}; {USAGE}")
    fmt, remote_code = cfg.get("format", "efficia"), cfg.get("remote_code")
    if remote_code is not None and (fmt != "hf" or not isinstance(remote_code, bool)):
        raise ConfigError(f"remote_code={remote_code!r}: give true or false, with format=hf; {USAGE}")
    out = save_pretrained(str(cfg.ckpt), str(cfg.out), overwrite=bool(cfg.get("overwrite", False)), format=fmt,
                          remote_code=remote_code)
    if fmt == "hf":
        written = json.loads((out / META).read_text())["transformers"]
        how = ", trust_remote_code=True" if written["remote_code"] else ""
        print(f"exported {cfg.ckpt} -> {out} as transformers' {written['class']}"
              f"{' (remote code: ' + written['why'] + ')' if written['remote_code'] else ''}\n"
              f"transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}{how}); "
              f"AutoTokenizer.from_pretrained({str(out)!r})\n"
              f"python: efficia.from_pretrained({str(out)!r})")
        return str(out)
    print(f"exported {cfg.ckpt} -> {out} (config.json, tokenizer.json, model.safetensors)\n"
          f"sample: python sample.py ckpt={out}\n"
          f"python: efficia.from_pretrained({str(out)!r})")
    return str(out)


def main(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv

    def run(_: None) -> str:
        options, _rest = command_options(args, __doc__, OPTIONS, required=("ckpt", "out"))
        return export(OmegaConf.create(options))

    return run_cli(run, None)
