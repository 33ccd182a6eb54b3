"""A real headless Chromium for the console's browser tests: Debian's ``chromium``
package, driven by Playwright (from PyPI) with that executable, so nothing is downloaded
at run time. Without the browser the tests fail, saying what to install; they are never
skipped (``.ci/run`` installs it)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("LEDGERLAKE_TEST_CHROMIUM") or shutil.which("chromium") or ""


@pytest.fixture
def browser() -> Iterator[Any]:
    """(Per test: Playwright's sync API holds an event loop on this thread while it
    runs, which the other tests of this worker process must not find running.)"""
    if not CHROMIUM:
        pytest.fail(
            "the console's browser tests need Chromium: `apt-get install -y chromium` "
            "(Debian/Ubuntu), or set LEDGERLAKE_TEST_CHROMIUM to a Chromium executable",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox"], headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def logged(message: Any) -> None:
        # (A 4xx the page shows is logged as a failed resource: that one is expected.)
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(message.text)

    page.on("console", logged)
    try:
        yield page
    finally:
        context.close()
    # An uncaught script error or a Content-Security-Policy violation fails the test.
    assert not errors, errors


SCREENSHOTS = os.environ.get("LEDGERLAKE_TEST_SCREENSHOTS", "")


def snap(page: Any, name: str) -> None:
    """A screenshot of the page for docs/console/ (taken when
    LEDGERLAKE_TEST_SCREENSHOTS names a directory: `make screenshots`)."""
    if SCREENSHOTS:
        page.screenshot(path=os.path.join(SCREENSHOTS, f"{name}.png"), full_page=True)
