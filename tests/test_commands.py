"""One argument style: every `python -m efficia.<command>` takes Hydra-style key=value arguments, answers --help
with its usage (exit 0) and refuses anything else in one line (exit 2)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def commands() -> list[str]:
    """Every `python -m efficia.<command>`: a module with a `__main__` guard, or a package with a __main__.py."""
    found = [p.stem for p in (ROOT / "efficia").glob("*.py") if 'if __name__ == "__main__":' in p.read_text()]
    found += [p.parent.name for p in (ROOT / "efficia").glob("*/__main__.py")]
    return sorted(found)


def test_the_commands_are_found() -> None:
    assert {"export", "plan", "sweep"} <= set(commands())


@pytest.mark.parametrize("command", commands())
def test_a_command_answers_help_with_its_usage(command: str) -> None:
    """The door itself (`python -m`), once per command: --help prints the usage first and exits 0."""
    proc = subprocess.run([sys.executable, "-m", f"efficia.{command}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"python -m efficia.{command} "), proc.stdout
    assert "=" in proc.stdout.splitlines()[0]  # the usage line shows key=value arguments


@pytest.mark.parametrize("command", commands())
def test_a_command_refuses_an_option_that_is_not_key_value(command: str, capsys) -> None:
    """`--mfu 0.3` (argparse's style) is refused in one line naming the usage, exit 2 (in-process: the door's
    `main`, which `python -m` runs)."""
    module = importlib.import_module(f"efficia.{command}" + (".__main__" if (ROOT / "efficia" / command).is_dir()
                                                             else ""))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--mfu", "0.3"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: '--mfu' is not a key=value option; usage: python -m efficia."
                           f"{command} "), line
