"""python -m efficia.plan [train.py overrides] [mfu=0.3] [context_gb=0.5] [table=-|<page>]

Plan a GPU run from a CPU, before you rent or wait for a card (docs/gpu-plan.md): memory by part at the peak of
one training step, the micro-batch and accumulation the GPU preset would choose, and the step time.

    python -m efficia.plan experiment=yinggem_shakespeare trainer=rtx3060   one run on one GPU preset
    python -m efficia.plan model=gpt scale=seed                             no trainer= preset: every GPU preset
    python train.py <overrides> plan=true                                   the same plan, through train.py
    python -m efficia.plan table=docs/gpu-plan.md                           every seed recipe on every GPU preset

Every key=value is a train.py override except the command's own:
    mfu=0.3         the assumed model FLOPs utilisation behind the step time, in (0, 1]
    context_gb=0.5  GiB a real card loses to the CUDA context, outside PyTorch's allocator
    table=<page>    the seed recipes' table (markdown), written between the page's plan-table markers;
                    table=- prints it; no train.py overrides with it

A run that does not fit, even at micro-batch 1 (or whose validation batch does not), prints its plan, then one
error line saying what to change, and exits 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from efficia.cli import command_options, run_cli
from efficia.errors import ConfigError
from efficia.plan.choose import ASSUMED_MFU, CUDA_CONTEXT_GB, check_plan_options
from efficia.plan.command import plan_command
from efficia.plan.table import table, table_page, write_table

OPTIONS = {"table": None, "mfu": ASSUMED_MFU, "context_gb": CUDA_CONTEXT_GB}


def plan(argv: Sequence[str]) -> None:
    """The command: its own options read, every other key=value passed to train.py's config."""
    options, overrides = command_options(argv, __doc__, OPTIONS, passthrough=True)
    usage = __doc__.strip().splitlines()[0]
    for key in ("mfu", "context_gb"):
        if isinstance(options[key], bool) or not isinstance(options[key], int | float):
            raise ConfigError(f"{key}={options[key]!r} is not a number; usage: {usage}")
    mfu, context_gb, page = float(options["mfu"]), float(options["context_gb"]), options["table"]
    check_plan_options(mfu, context_gb)
    if "table" in {arg.split("=", 1)[0] for arg in argv} and not (isinstance(page, str) and page.strip()
                                                                  and "=" not in page):
        raw = next(a for a in argv if a.startswith("table=")).split("=", 1)[1]
        raise ConfigError(f"table={raw}: give the path of a markdown page (table=docs/gpu-"
                          "plan.md) or table=- to print the table; train.py overrides go as their own arguments")
    if page is None:
        plan_command(overrides, mfu, context_gb)
        return
    if overrides:
        raise ConfigError(f"table= plans the seed recipes; give no train.py overrides with it ({' '.join(overrides)})"
                          " (mfu= and context_gb= apply)")
    if page != "-":
        table_page(Path(str(page)))  # before minutes of planning, not after
    text = table(mfu, context_gb)
    if page == "-":
        print(text)
    else:
        write_table(Path(str(page)), text)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(lambda _: plan(sys.argv[1:] if argv is None else argv), None)


if __name__ == "__main__":
    main()
