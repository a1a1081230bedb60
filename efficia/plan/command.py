"""The two doors to a plan, `python -m efficia.plan <overrides>` and `python train.py <overrides> plan=true`: the
run composed as train.py would compose it, planned on its GPU preset (or on every one), printed."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from efficia.config import CONF_DIR, compose_run
from efficia.errors import ConfigError
from efficia.plan.choose import ASSUMED_MFU, CUDA_CONTEXT_GB, Plan, plan_run
from efficia.plan.report import format_plan, what_to_change


def compose(overrides: Sequence[str], output_dir: str | Path | None = None) -> DictConfig:
    """The config `python train.py <overrides>` would get; a plan writes nothing, so by default its run dir is a
    path in the temp folder that is never made."""
    from hydra.errors import HydraException

    from efficia.checks import first_line

    try:
        return compose_run(list(overrides), output_dir or Path(tempfile.gettempdir()) / "efficia-plan")
    except HydraException as err:
        raise ConfigError(f"{first_line(err)}; check the overrides ({' '.join(overrides)})") from None


@functools.lru_cache(maxsize=1)
def gpu_presets() -> tuple[str, ...]:
    """conf/trainer/ presets with a GPU budget (a new card's yaml joins by existing)."""
    names = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))
    return tuple(n for n in names if (compose([f"trainer={n}"]).get("callbacks") or {}).get("gpu_budget"))


def preset_configs(overrides: Sequence[str]) -> list[DictConfig]:
    """The run as given if it has a GPU preset; otherwise the same run on every GPU preset."""
    cfg = compose(overrides)
    if (cfg.get("callbacks") or {}).get("gpu_budget"):
        return [cfg]
    rest = [o for o in overrides if not o.startswith("trainer=")]
    return [compose([*rest, f"trainer={preset}"]) for preset in gpu_presets()]


def plan_command(overrides: Sequence[str], mfu: float = ASSUMED_MFU, context_gb: float = CUDA_CONTEXT_GB) -> list[Plan]:
    """Print the plan of each preset; a run that does not fit even at micro-batch 1 ends in one ConfigError line."""
    plans = []
    for cfg in preset_configs(overrides):
        plans.append(plan_run(cfg, mfu, context_gb))
        print(format_plan(plans[-1]) + "\n", flush=True)
    failing = [p for p in plans if not p.fits]
    if failing:
        fitting = [p.card for p in plans if p.fits]
        also = f" (it fits the {', '.join(fitting)} preset)" if fitting else ""
        raise ConfigError(what_to_change(failing[0]) + also)
    return plans


def plan_from_hydra(cfg: DictConfig) -> list[Plan]:
    """`python train.py <overrides> plan=true`: the same plan, from the overrides Hydra was given."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").split("=", 1)[0] != "plan"]
    return plan_command(overrides)
