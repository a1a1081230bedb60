"""python -m efficia.harness ckpt=<.ckpt or folder> tasks=<task[,task...]> [include_path=<folder of task yamls>]

lm-evaluation-harness's tasks on any efficia model, through the harness's model registry (the model `efficia`,
efficia/evaluation/harness.py). Needs the [eval] extra: pip install -e '.[eval]'.
tasks: harness task names, comma-separated. include_path: a folder of your own task yamls.
builtin_tasks: false skips indexing the harness's ~10,000 built-in task files (seconds) when every task is yours.
limit: documents per task (null: all). num_fewshot: null (the task's own). batch_size: requests per forward (8).
device: cpu (default), cuda, auto. output: a JSON file for the harness's results (with every request's answer).
Prints the harness's results table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from efficia.cli import command_options, run_cli
from efficia.errors import ConfigError

OPTIONS = {"ckpt": None, "tasks": None, "include_path": None, "builtin_tasks": True, "limit": None,
           "num_fewshot": None, "batch_size": 8, "device": "cpu", "output": None}


def harness(options: dict[str, Any]) -> dict[str, Any]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        import efficia.evaluation.harness  # noqa: F401  (registers the model `efficia`)
    except ImportError as err:
        raise ConfigError(f"the harness needs lm-eval ({err}); pip install 'efficia[eval]' "
                          "(or pip install -e '.[eval]' in a clone)") from None
    tasks = [t.strip() for t in str(options["tasks"]).split(",") if t.strip()]
    manager = TaskManager(include_path=options["include_path"], include_defaults=bool(options["builtin_tasks"]))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}; name harness tasks or put your own yamls in "
                          "include_path=<folder>")
    out = simple_evaluate(model="efficia", model_args={"ckpt": str(options["ckpt"]), "device": options["device"],
                                                       "batch_size": options["batch_size"]},
                          tasks=tasks, task_manager=manager, limit=options["limit"],
                          num_fewshot=options["num_fewshot"], log_samples=options["output"] is not None)
    print(make_table(out))
    if options["output"]:
        path = Path(options["output"]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: out[k] for k in ("results", "configs", "samples") if k in out},
                                   default=str, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = sys.argv[1:] if argv is None else argv

    def run(_: None) -> dict[str, Any]:
        options, _rest = command_options(args, __doc__, OPTIONS, required=("ckpt", "tasks"))
        return harness(options)

    return run_cli(run, None)


if __name__ == "__main__":
    main()
