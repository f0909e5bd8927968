"""A real browser for the UI tests: Debian's chromium (/usr/bin/chromium, installed by `make install`) driven
by Playwright. Playwright's own browser download needs a network; its driver works with this one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[1] / "artifacts"  # tests/artifacts/ (git ignores it): what each UI test saw
# Without these, chromium keeps calling Google's hosts, which this closed network refuses, many at a time.
QUIET_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@contextmanager
def browser_page(width: int = 1400, height: int = 1000) -> Iterator:
    """A fresh headless chromium page (its own profile), closed on exit."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: `make install` puts it there (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=QUIET_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def screenshot(page, name: str, folder: Path = SHOTS) -> Path:
    """A full-page PNG of what the test saw, kept as a test artifact (tests/artifacts/NAME.png)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
