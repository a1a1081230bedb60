"""Remote-code exports, generated from the model's own source: the architecture's module and every efficia
module it imports (the shared blocks, the decoder skeleton, the registry, errors) are copied into the folder
with `from efficia.models.X import` / `from efficia.X import` rewritten to `from .X import`, beside two
fixed files (templates/configuration_efficia.py and templates/modeling_efficia.py) that wrap the model for
transformers. So the exported math is efficia's and cannot drift from it; only import lines differ.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

from torch import nn

from efficia.errors import CheckpointError

TEMPLATES = Path(__file__).with_name("templates")
MODELING, CONFIGURATION = "modeling_efficia.py", "configuration_efficia.py"
BUNDLEABLE = ("efficia.models.", "efficia.errors")  # what a model module may import and still be bundled
IMPORT = re.compile(r"^(\s*)from efficia(?:\.models)?\.(\w+) import", flags=re.MULTILINE)
MARKER = "efficia:architecture"


def efficia_imports(source: str) -> list[str]:
    """Every module of efficia this source imports, at any depth (a function-level import counts too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "efficia":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "efficia"]
    return found


def make_relative(source: str) -> str:
    return IMPORT.sub(r"\1from .\2 import", source)


def bundle(module_name: str) -> dict[str, str]:
    """File name -> source of `module_name` and every efficia module it imports, imports made relative."""
    files: dict[str, str] = {}
    origin: dict[str, str] = {}
    todo = [module_name]
    while todo:
        name = todo.pop()
        file = Path(importlib.import_module(name).__file__)
        if file.name == "__init__.py" or not name.startswith(BUNDLEABLE):
            raise CheckpointError(f"cannot export {module_name} as remote code: it imports {name}, outside "
                                  "efficia.models and efficia.errors (move that import out of the model's module)")
        if file.name in files:
            if origin[file.name] != name:
                raise CheckpointError(f"cannot bundle both {origin[file.name]} and {name}: one file name {file.name}")
            continue
        source = file.read_text()
        origin[file.name] = name
        files[file.name] = make_relative(source)
        todo += efficia_imports(source)
    for file_name, source in files.items():
        left = efficia_imports(source)
        if left:
            raise CheckpointError(f"cannot export {module_name} as remote code: {file_name} imports {left[0]} "
                                  "in a form that cannot be made relative (use `from efficia.x import y`)")
    return files


def remote_files(net: nn.Module) -> dict[str, str]:
    """Every Python file of a remote-code folder for `net`: its bundled source and the two wrappers."""
    cls = type(net)
    files = bundle(cls.__module__)
    if CONFIGURATION in files or MODELING in files:
        raise CheckpointError(f"a model module may not be named {CONFIGURATION} or {MODELING}")
    files[CONFIGURATION] = (TEMPLATES / CONFIGURATION).read_text()
    module = cls.__module__.rsplit(".", 1)[-1]
    lines = [f"from .{module} import {cls.__name__}  # noqa: F401  {MARKER} (registers the exported architecture)"
             if MARKER in line else line for line in (TEMPLATES / MODELING).read_text().splitlines()]
    files[MODELING] = "\n".join(lines) + "\n"
    return files
