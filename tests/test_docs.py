"""Every Python code block of README.md and docs/*.md runs, and the docs site builds strictly.

Blocks are collected the way pytest-codeblocks collects them: each fenced block whose info string
is ``python`` (or ``py``) is one test, run on its own in a fresh namespace, in a temporary working
directory. An HTML comment on the line just before the opening fence changes that:

* ``<!-- skip: REASON -->`` skips the block (the reason is required and shown by pytest);
* ``<!-- continue -->`` runs the block after the previous Python block of the same file, in its
  namespace (the chain is one test, named after its first block).

Tracebacks point at the Markdown file and line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>skip|continue)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$")
PYTHON = {"python", "py", "python3"}


@dataclass
class CodeBlock:
    """Python code of one or more chained blocks and where its first block starts."""

    path: Path
    line: int  # 1-based line of the first block's first code line
    code: str  # padded with blank lines so that line numbers match the Markdown file
    skip: Optional[str] = None
    lines: List[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        """'docs/x.md:LINE' (the line of the opening fence)."""
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line - 1}"


def markdown_files() -> List[Path]:
    """README.md and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def code_blocks(path: Path) -> List[CodeBlock]:
    """The Python blocks of a Markdown file, chains of `continue` blocks joined."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[CodeBlock] = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, info, indent = match["fence"], match["info"].lower(), len(match["indent"])
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if info in PYTHON:
            body = [line[indent:] for line in lines[index + 1 : end]]
            previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            marker = MARKER.match(previous)
            kind = marker["kind"] if marker else None
            if kind == "skip" and not (marker["reason"] or "").strip():
                raise ValueError(f"{path}:{index}: '<!-- skip: REASON -->' needs a reason")
            if kind == "continue":
                if not blocks:
                    raise ValueError(f"{path}:{index}: '<!-- continue -->' with no block before it")
                chain = blocks[-1]
                padding = index + 1 - chain.code.count("\n")
                chain.code += "\n" * padding + "\n".join(body) + "\n"
                chain.lines.append(index + 2)
            else:
                code = "\n" * (index + 1) + "\n".join(body) + "\n"
                blocks.append(
                    CodeBlock(
                        path, index + 2, code, marker["reason"] if kind == "skip" else None, [index + 2]
                    )
                )
        index = end + 1
    return blocks


def _all_blocks() -> List[CodeBlock]:
    return [block for path in markdown_files() for block in code_blocks(path)]


BLOCKS = _all_blocks()


def test_collector_reads_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\na = 1\n```\n\n<!-- continue -->\n```python\nb = a + 1\n```\n"
        "\n<!-- skip: needs a server -->\n```py\nraise SystemExit\n```\n\n```bash\nls\n```\n"
        "    ```python\n    c = 3\n    ```\n"
    )
    first, skipped, indented = code_blocks(page)
    assert first.lines == [4, 9] and first.skip is None
    namespace: dict = {}
    exec(compile(first.code, str(page), "exec"), namespace)
    assert namespace["b"] == 2
    assert first.code.splitlines()[8] == "b = a + 1"  # line numbers match the Markdown file
    assert skipped.skip == "needs a server" and indented.code.strip() == "c = 3"


def test_blocks_were_found():
    assert len(BLOCKS) >= 8, [block.name for block in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_code_block_runs(block: CodeBlock, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(block.skip)
    import torch

    torch._dynamo.reset()
    monkeypatch.chdir(tmp_path)
    # run as a script does (like runpy): its classes live in a real `__main__`, so they pickle
    main = types.ModuleType("__main__")
    main.__file__ = str(block.path)
    monkeypatch.setitem(sys.modules, "__main__", main)
    exec(compile(block.code, str(block.path), "exec"), main.__dict__)


def test_mkdocs_build_strict(tmp_path):
    """The site (guides plus the API reference from the docstrings) builds with no warning."""
    pytest.importorskip("mkdocs", reason="install the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="install the docs extra")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
