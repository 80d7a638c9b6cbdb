"""Every code example in the docs and in public docstrings runs, so none can drift."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import pytest

import netcl
import netcl.distributed
import netcl.optim
import netcl.optim.rmsprop

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples(text: str) -> list[str]:
    return [textwrap.dedent(block) for block in FENCE.findall(textwrap.dedent(text))]


def test_there_are_pages_with_examples() -> None:
    assert sum(bool(_examples(p.read_text())) for p in PAGES) >= 6


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT / "docs")) for p in PAGES])
def test_page_examples_run(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    for block in _examples(page.read_text()):
        exec(compile(block, str(page), "exec"), namespace)


def _documented() -> list[object]:
    objects: list[object] = [netcl, netcl.optim, netcl.optim.rmsprop, netcl.distributed]
    for module in (netcl, netcl.optim, netcl.distributed):
        objects += [getattr(module, name) for name in module.__all__ if not name.startswith("__")]
    return objects


@pytest.mark.parametrize("obj", _documented(), ids=lambda o: getattr(o, "__qualname__", getattr(o, "__name__", "?")))
def test_docstring_examples_run(obj: object) -> None:
    doc = inspect.getdoc(obj) or ""
    namespace: dict[str, object] = {"__name__": "docstring"}
    for block in _examples(doc):
        exec(compile(block, f"docstring of {obj!r}", "exec"), namespace)
