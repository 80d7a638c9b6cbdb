"""netcl's types as checkers see them: basedpyright on the usage files, type completeness
of the installed package, and mypy --strict on every example of the docs.

(mypy --strict on netcl/ and tests/, usage files included, runs as its own CI step.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def test_basedpyright_checks_the_usage_files() -> None:
    result = _run([str(BIN / "basedpyright"), "tests/typing"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 errors" in result.stdout


def test_public_api_is_fully_typed_when_installed(tmp_path: Path) -> None:
    """basedpyright --verifytypes against a wheel install, not the editable checkout."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
    )
    (wheel,) = wheels.glob("netcl-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [str(BIN / "basedpyright"), "--verifytypes", "netcl", "--ignoreexternal", "--outputjson"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    report = json.loads(result.stdout)["typeCompleteness"]
    assert str(site) in report["moduleRootDirectory"] or str(site) in report.get("packageRootDirectory", "")
    problems = [d["message"] for s in report["symbols"] for d in s.get("diagnostics", [])]
    assert report["completenessScore"] == 1.0, problems
    assert problems == []


def test_mypy_strict_passes_on_the_docs_examples(tmp_path: Path) -> None:
    fence = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
    pages = sorted((ROOT / "docs").rglob("*.md"))
    written = 0
    for page in pages:
        blocks = fence.findall(page.read_text())
        if blocks:
            name = "docs_" + re.sub(r"\W", "_", str(page.relative_to(ROOT / "docs")).removesuffix(".md"))
            (tmp_path / f"{name}.py").write_text("\n".join(textwrap.dedent(b) for b in blocks))
            written += 1
    assert written >= 6
    result = _run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"), str(tmp_path)],
        env={**os.environ, "MYPYPATH": str(ROOT / "stubs")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
