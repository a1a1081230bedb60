"""What train.py and sample.py share: errors meant for a person become one line, nothing heavier is imported."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from efficia.errors import EfficiaError


def run_cli(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Errors meant for a person print as one line and exit 2 (a stop by signal: 128 + its number, as a shell
    reports it); anything else is a real bug and keeps its trace."""
    try:
        return fn(cfg)
    except EfficiaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
