"""The README is a guide that stays true: its layout names every module (docs/testing.md every test and
benchmark), it links every document, and every document the code or the yamls cite exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_block(text: str, heading: str) -> str:
    section = text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


@pytest.mark.parametrize(("document", "heading", "folders"), [
    ("README.md", "Layout", ("efficia",)),
    ("docs/testing.md", "Files", ("bench", "tests"))])
def test_layout_lists_every_module(document: str, heading: str, folders: tuple[str, ...]) -> None:
    layout = code_block((ROOT / document).read_text(encoding="utf-8"), heading)
    sources = [p for folder in folders for p in (ROOT / folder).rglob("*.py")
               if p.name != "__init__.py" or p.parent.name == "efficia"]
    # a name shared by several files (attention.py, quantize.py) must appear once per file
    missing = [str(p.relative_to(ROOT)) for p in sources
               if len(re.findall(rf"(?<![\w.-]){re.escape(p.name)}\b", layout))
               < sum(q.name == p.name for q in sources)]
    assert not missing, f"{document}'s {heading} does not name {missing}: add a line for each"


def test_readme_links_every_document() -> None:
    linked = set(re.findall(r"\]\((docs/[^)#]+)\)", README))
    docs = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    assert docs <= linked, f"README's Further reading does not link {sorted(docs - linked)}"


def test_cited_documents_exist() -> None:
    cited: dict[str, str] = {}
    for path in [*(ROOT / "conf").rglob("*.yaml"), *(ROOT / "efficia").rglob("*.py")]:
        for name in re.findall(r"docs/[\w.-]+\.md", path.read_text(encoding="utf-8")):
            cited.setdefault(name, str(path.relative_to(ROOT)))
    for doc in (ROOT / "docs").glob("*.md"):  # links between documents
        for name in re.findall(r"\]\(([\w.-]+\.md)\)", doc.read_text(encoding="utf-8")):
            cited.setdefault(f"docs/{name}", str(doc.relative_to(ROOT)))
    missing = {name: source for name, source in cited.items() if not (ROOT / name).is_file()}
    assert cited and not missing, f"documents cited but not in the repository: {missing}"


def readme_setup_lines() -> list[str]:
    """The install and test lines of the README's Quickstart, comments dropped."""
    block = README.split("\n## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith(("pip install", "python -m pytest"))]


def test_ci_runs_exactly_the_readme_install_and_test_lines() -> None:
    """A green CI means a newcomer's run is green: .ci/run's install and test lines are the README's, in order."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    ci_lines = [line for line in ci if line.startswith(("pip install", "python -m pytest", "pytest"))]
    readme = readme_setup_lines()
    assert len(readme) >= 3, f"the README's Quickstart lost its install or test line: {readme}"
    assert ci_lines == readme, f".ci/run runs {ci_lines}; the README says {readme}: make them the same"
