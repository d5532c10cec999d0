"""A real browser for the dashboard's tests: Debian's Chromium driven by Playwright (no browser download:
`executable_path`), started once per session. Screenshots go to $HBREG_ARTIFACTS (default
tests/artifacts), kept as the run's artifacts."""

from __future__ import annotations

import os
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from heartbeat_registry.hbreg.bench.dashboard import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import require_binary

ARTIFACTS = pathlib.Path(os.environ.get("HBREG_ARTIFACTS", pathlib.Path(__file__).resolve().parents[1] / "artifacts"))
AXE = pathlib.Path(__file__).resolve().parent / "vendor" / "axe.min.js"


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    require_binary(os.path.exists(CHROMIUM), "chromium (Debian's package; make test installs it)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        require_binary(False, "playwright (the Python package; make test installs it)")
        raise
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


class Page:
    """A page with its console errors collected (a test fails on any)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    async def screenshot(self, name: str) -> pathlib.Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def accessibility_violations(self) -> list[str]:
        """axe-core's serious and critical violations on the page as it is now."""
        await self.page.add_script_tag(content=AXE.read_text())
        result = await self.page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
        return [
            f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes'][:3]]}"
            for v in result["violations"]
            if v["impact"] in ("serious", "critical")
        ]


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Page]:
    # bypass_csp only so that the test can inject axe-core; the page's own CSP is asserted separately
    context = await browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    try:
        yield Page(await context.new_page())
    finally:
        await context.close()
