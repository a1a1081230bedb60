"""The docs table (docs/gpu-plan.md): every seed recipe planned on every GPU preset, as markdown, written between
the page's markers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from efficia.config import CONF_DIR
from efficia.errors import ConfigError
from efficia.plan.choose import ASSUMED_MFU, CUDA_CONTEXT_GB, Choice, plan_run
from efficia.plan.command import compose, gpu_presets
from efficia.plan.report import gib, rate, seconds


def seed_recipes() -> list[list[str]]:
    """Each experiment that trains at scale=seed (the seeds' own recipes), then `model=X scale=seed` for every
    model: the runs the GPU presets exist for."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    recipes = []
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = hydra_compose("train", overrides=[f"experiment={path.stem}"], return_hydra_config=True)
        if cfg.hydra.runtime.choices.get("scale") == "seed":
            recipes.append([f"experiment={path.stem}"])
    recipes += [[f"model={p.stem}", "scale=seed"] for p in sorted((CONF_DIR / "model").glob("*.yaml"))]
    return recipes


def table(mfu: float = ASSUMED_MFU, context_gb: float = CUDA_CONTEXT_GB) -> str:
    """A markdown table of every seed recipe on every GPU preset (runs that do not fit say so; no error)."""
    header = ("| recipe | preset | params | precision, optimizer | batch x tokens | checkpointing off: "
              "micro x accum, peak | checkpointing on: micro x accum, peak | step time off / on | tokens/s off / on "
              "| validation batch, peak |")
    lines = [header, "|" + "---|" * 10]
    for recipe in seed_recipes():
        for preset in gpu_presets():
            plan = plan_run(compose([*recipe, f"trainer={preset}"]), mfu, context_gb)
            by_setting = {c.checkpointing: c for c in plan.choices}

            def cell(c: Choice | None) -> str:
                if c is None:
                    return "n/a"
                if c.micro_batch is None:
                    return f"does not fit ({gib(c.memory.peak)} at 1)"
                return f"{c.micro_batch} x {c.accumulate}, {gib(c.memory.peak)}"

            off, on = by_setting.get(False), by_setting.get(True)
            time = " / ".join(seconds(plan.step_seconds(c)) for c in (off, on) if c)
            rates = " / ".join(rate(plan.tokens_per_second(c)) for c in (off, on) if c)
            lines.append(f"| `{' '.join(recipe)}` | {preset} | {plan.params / 1e6:.1f}M | {plan.precision}, "
                         f"{plan.optimizer} | {plan.batch_size} x {plan.seq_len:,} | {cell(off)} | {cell(on)} | "
                         f"{time} | {rates} | {plan.val_batch_size}, {gib(plan.validation.peak)}"
                         + ("" if plan.val_fits == plan.val_batch_size else
                            f": does not fit, {plan.val_fits or 'nothing'} does") + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


TABLE_START, TABLE_END = "<!-- plan-table:start -->", "<!-- plan-table:end -->"


def table_page(path: Path) -> str:
    """The text of a page the table can go into (one with the markers); checked before the table is made."""
    if not path.is_file():
        raise ConfigError(f"table={path}: no such page; give a markdown page with the {TABLE_START} ... "
                          f"{TABLE_END} markers (docs/gpu-plan.md), or table=- to print the table")
    page = path.read_text(encoding="utf-8")
    if TABLE_START not in page or TABLE_END not in page:
        raise ConfigError(f"{path} has no {TABLE_START} ... {TABLE_END} markers to put the table between")
    return page


def write_table(path: Path, text: str) -> None:
    """Replace what lies between the table markers in `path` (atomically: never a half-written page)."""
    page = table_page(path)
    before, rest = page.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{before}{TABLE_START}\n{text}\n{TABLE_END}{after}", encoding="utf-8")
    os.replace(tmp, path)
