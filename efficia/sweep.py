"""python -m efficia.sweep dir=<sweep dir>

Rebuild a multirun's report (summary.csv, summary.md, summary.png, and compare.md for a comparison) in its
sweep folder from the jobs' run_record.json files, e.g. after an interrupted sweep: dir=multirun/<date>/<time>.
"""

from __future__ import annotations

import sys
from pathlib import Path

from efficia.cli import command_options, run_cli
from efficia.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    def run(_: None) -> None:
        options, _rest = command_options(sys.argv[1:] if argv is None else argv, __doc__, {"dir": None},
                                         required=("dir",))
        sweep_dir = Path(str(options["dir"]))
        if not sweep_dir.is_dir():
            raise ConfigError(f"dir={options['dir']} is not a folder; give a multirun sweep folder "
                              "(multirun/<date>/<time>)")
        from efficia.training.compare import comparison_of, write_comparison
        from efficia.training.sweep import write_report

        print(write_report(sweep_dir) or f"no jobs found under {sweep_dir}")
        protocol = comparison_of(sweep_dir)
        if protocol is not None:
            print(write_comparison(sweep_dir, protocol))

    run_cli(run, None)


if __name__ == "__main__":
    main()
