"""Build the docs site and read it in headless Chromium, as a reader would.

Needs Debian's `chromium` (which `.ci/run` installs) and the `playwright` package, which
drives that browser (it downloads none). Outside CI the test skips without them; in CI
(`CI` set) it fails.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _require(what: str, ok: bool) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing; CI must have it")
        pytest.skip(f"{what} is missing")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    out = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    _require("the chromium browser", chromium is not None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require("the playwright package", False)
        raise
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


PAGES = [
    "",
    "concepts/rmsprop/",
    "concepts/sgd/",
    "concepts/adam/",
    "concepts/adamw/",
    "api/sgd/",
    "api/adam/",
    "guides/pyopencl-arrays/",
    "guides/array-libraries/",
    "guides/half-precision/",
    "guides/param-groups/",
    "guides/checkpoints/",
    "guides/devices/",
    "guides/typing/",
    "guides/distributed/",
    "api/netcl/",
    "api/optim/",
    "api/rmsprop/",
    "api/adamw/",
    "api/lr_scheduler/",
    "api/distributed/",
    "reliability/",
    "benchmarks/",
]


def _open(browser: Any, url: str) -> tuple[Any, list[str]]:
    """A page at `url`, with a list that collects every failed or outside request and
    every console error."""
    problems: list[str] = []
    page = browser.new_page()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    page.on(
        "request",
        lambda r: (
            None
            if r.url.startswith(url.split("/", 3)[0] + "//127.0.0.1") or r.url.startswith("data:")
            else problems.append(f"outside request: {r.url}")
        ),
    )
    page.goto(url, wait_until="networkidle")
    return page, problems


@pytest.mark.parametrize("path", PAGES)
def test_every_page_loads_cleanly_offline(site: str, browser: Any, path: str) -> None:
    page, problems = _open(browser, site + path)
    assert page.title()
    assert problems == []
    page.close()


@pytest.mark.parametrize(
    "path", ["benchmarks/", "reliability/", "guides/distributed/", "guides/half-precision/", "concepts/rmsprop/"]
)
def test_tables_fit_a_1280_pixel_window(site: str, browser: Any, path: str) -> None:
    """No table needs a horizontal scroll bar, nor widens the page, in a 1280x800 window."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(site + path, wait_until="networkidle")
    tables = page.evaluate(
        """() => [...document.querySelectorAll('.md-typeset__scrollwrap')].map(
            w => [w.querySelector('table').rows[0].cells.length, w.scrollWidth, w.clientWidth])"""
    )
    assert tables, f"{path} has no table"
    assert [t for t in tables if t[1] > t[2]] == [], f"{path}: tables [columns, width, room] wider than the page"
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    page.close()


def test_concept_page_shows_its_equations(site: str, browser: Any) -> None:
    page, problems = _open(browser, site + "concepts/rmsprop/")
    text = page.inner_text("article")
    for line in (
        "v_t     = alpha * v_{t-1} + (1 - alpha) * g_t ** 2",
        "theta_t = theta_{t-1} - lr * g_t / (sqrt(v_t) + eps)",
        "param[i] -= lr * g[i] / (sqrt(v[i]) + eps);",
    ):
        assert line in text
    for heading in (
        "Overview",
        "Where It Lives",
        "How It Works",
        "Code Example",
        "Performance & Trade-offs",
        "See also",
    ):
        assert page.get_by_role("heading", name=heading).count() == 1
    assert problems == []


def test_api_page_lists_rmsprops_arguments_with_types(site: str, browser: Any) -> None:
    page, _ = _open(browser, site + "api/optim/")
    text = " ".join(page.inner_text("article").split())
    for argument in (
        "lr: float = 0.001",
        "alpha: float = 0.99",
        "eps: float = 1e-08",
        "weight_decay: float = 0.0",
        "momentum: float = 0.0",
        "centered: bool = False",
        "maximize: bool = False",
    ):
        assert argument in text


def test_search_finds_rmsprop(site: str, browser: Any) -> None:
    page, problems = _open(browser, site)
    page.keyboard.press("/")
    page.keyboard.type("RMSProp")
    results = page.locator(".md-search-result__item")
    results.first.wait_for(timeout=10_000)
    assert results.count() >= 1
    assert "RMSProp" in results.first.inner_text()
    assert problems == []


def test_code_blocks_have_copy_buttons_and_both_palettes_exist(site: str, browser: Any) -> None:
    page, _ = _open(browser, site)
    copy = page.locator("button[data-md-type='copy']")
    copy.first.wait_for(state="attached", timeout=10_000)
    assert copy.count() == page.locator("div.highlight pre").count() >= 3
    assert page.locator("[data-md-color-scheme]").count() >= 1
    assert page.locator("input[data-md-color-scheme='slate']").count() == 1
