"""`python -m efficia.harness --model efficia --model_args ckpt=<.ckpt or folder> --tasks <tasks> [lm_eval options]`:
lm-evaluation-harness's own `lm_eval` command with the `efficia` model registered (efficia/evaluation/harness.py).
Needs the [eval] extra: pip install -e '.[eval]'."""

from __future__ import annotations

import sys

from efficia.cli import run_cli
from efficia.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    def run(_: None) -> None:
        try:
            from lm_eval.__main__ import cli_evaluate

            import efficia.evaluation.harness  # noqa: F401  (registers the model `efficia`)
        except ImportError as err:
            raise ConfigError(f"the harness needs lm-eval ({err}); pip install 'efficia[eval]' "
                              "(or pip install -e '.[eval]' in a clone)") from None
        saved = sys.argv
        sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]  # the harness parses sys.argv itself
        try:
            cli_evaluate()
        finally:
            sys.argv = saved

    run_cli(run, None)


if __name__ == "__main__":
    main()
