"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one namespace, as a reader typing them into one Python
session would (a later block may use what an earlier one defined); one test per file, run in a
temporary directory, so files a block writes land there. A failure names the file, the block's
first line number and the exception.

A block is left out only by an explicit marker on its first line, with the reason:

    ```python
    # not-run: needs a CUDA GPU
    ...
    ```
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Documents whose blocks do not run yet, while their text is being fixed: strict, so the entry
# must go (the test then XPASSes and fails) as soon as the document runs.
NOT_YET_RUNNING: dict[str, str] = {}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)$")
SKIP_MARKER = re.compile(r"^#\s*not-run:\s*(?P<reason>\S.*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int          # 1-based line of the block's first code line
    code: str

    @property
    def skip_reason(self) -> str | None:
        first = self.code.lstrip("\n").splitlines()[0].strip() if self.code.strip() else ""
        match = SKIP_MARKER.match(first)
        return match["reason"] if match else None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file (indented ones too, e.g. inside a list item),
    their indentation removed."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, info = opening["indent"], opening["info"].strip().lower()
        start = i + 1
        i = start
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if info.split()[:1] == ["python"]:
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                    for line in lines[start:i]]
            blocks.append(Block(path, start + 1, "\n".join(body) + "\n"))
        i += 1
    return blocks


def test_the_extractor_finds_blocks_and_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n```python\nx = 1\n```\n* item\n\n  ```python\n  y = x + 1\n  ```\n"
                   "```bash\nls\n```\n```python\n# not-run: needs a GPU\nimport cupy\n```\n")
    blocks = python_blocks(doc)
    assert [b.code for b in blocks] == ["x = 1\n", "y = x + 1\n",
                                        "# not-run: needs a GPU\nimport cupy\n"]
    assert [b.line for b in blocks] == [3, 8, 14]
    assert [b.skip_reason for b in blocks] == [None, None, "needs a GPU"]


def _document_param(path: Path):
    name = str(path.relative_to(REPO))
    marks = ([pytest.mark.xfail(reason=NOT_YET_RUNNING[name], strict=True)]
             if name in NOT_YET_RUNNING else [])
    return pytest.param(path, id=name, marks=marks)


@pytest.mark.parametrize("path", [_document_param(p) for p in DOCUMENTS])
def test_python_blocks_run_as_written(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__main__"}
    skipped, failure = [], None
    for block in blocks:
        if block.skip_reason is not None:
            skipped.append(f"{block.where} ({block.skip_reason})")
            continue
        try:
            exec(compile(block.code, block.where, "exec"), namespace)
        except Exception:
            failure = f"the python block at {block.where} raised:\n{traceback.format_exc()}"
            break
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    if skipped:
        print("blocks not run (marked):", "; ".join(skipped))
