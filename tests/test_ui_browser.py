"""The dashboard in a real browser: Debian's chromium, driven headless by Playwright.

``stepvault ui`` and ``stepvault run`` run as real processes over a FileStore
filled by real workflow runs; the browser signs in, filters the sessions, opens a
session, sees its timeline bars, and watches a running session advance without
reloading the page.

The browser is the system's (``apt-get install chromium``), launched by its path:
nothing is downloaded. Without it, or without the ``playwright`` package, the test
skips and says why; in CI (``CI`` set, or ``STEPVAULT_REQUIRE_BROWSER=1``) it fails.

Screenshots of the three pages are saved in ``STEPVAULT_UI_ARTIFACTS`` (default: the
test's own temporary folder). To refresh the ones docs/dashboard.md shows::

    STEPVAULT_UI_ARTIFACTS=docs/images .venv/bin/python -m pytest tests/test_ui_browser.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ui_support import fill, open_gate

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "a-long-dashboard-token-for-tests"  # noqa: S105  # the tests' own
LIVE_TIMEOUT = 20_000
"""Milliseconds to wait for the page to show a change (it polls every second)."""


def _required() -> bool:
    ci = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
    return ci or os.environ.get("STEPVAULT_REQUIRE_BROWSER") == "1"


@pytest.fixture
def chromium() -> str:
    """The system browser's path; skip (fail in CI) when it or Playwright is missing."""
    problem = None
    path = shutil.which("chromium")
    if path is None:
        problem = "Debian's chromium is not installed: apt-get install -y chromium"
    try:
        import playwright.sync_api  # noqa: F401, PLC0415  # only this test needs it
    except ImportError:
        problem = "the playwright package is not installed: pip install -e '.[test]'"
    if problem is not None or path is None:
        message = f"{problem}; the browser test needs it"
        if _required():
            pytest.fail(f"{message} (required in CI)")
        pytest.skip(message)
    return path


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: STEPVAULT_UI_ARTIFACTS (relative to the repo), else tmp_path."""
    chosen = os.environ.get("STEPVAULT_UI_ARTIFACTS")
    folder = (ROOT / chosen) if chosen else tmp_path / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def process(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Run ``stepvault ARGS`` in a real process; stop it with SIGTERM at the end."""
    command = [sys.executable, "-m", "engine.cli", *args]
    child = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        finally:
            child.kill()
            if child.stderr is not None:
                child.stderr.close()


def _url_of(server: subprocess.Popen[str]) -> str:
    assert server.stderr is not None
    banner = server.stderr.readline()
    found = re.search(r"on (http://\S+) ", banner)
    assert found is not None, f"stepvault ui did not start: {banner}"
    return found.group(1)


def _running_pipeline(url: str, within: float = 30) -> str:
    """Return the id of the pipeline session the run process started, once it runs."""
    deadline = time.monotonic() + within
    headers = {"authorization": f"Bearer {TOKEN}"}
    while True:
        query = {"workflow": "pipeline", "status": "running"}
        rows = httpx.get(f"{url}/api/sessions", params=query, headers=headers, timeout=10)
        sessions: list[dict[str, Any]] = rows.json()["sessions"]
        if sessions:
            return str(sessions[0]["id"])
        assert time.monotonic() < deadline, "the pipeline session never started"
        time.sleep(0.05)


def test_dashboard_in_a_real_browser(chromium: str, tmp_path: Path, artifacts: Path) -> None:
    from playwright.sync_api import expect, sync_playwright  # noqa: PLC0415

    # Given a filled store, the dashboard serving it, and a pipeline held at its first gate
    filled = asyncio.run(fill(tmp_path / "sessions"))
    gates = tmp_path / "gates"
    store = str(filled.folder)
    env = {"STEPVAULT_UI_TOKEN": TOKEN, "STEPVAULT_STORE": store}
    with (
        process("ui", "--port", "0", env=env) as server,
        process(
            "run",
            "tests/ui_support.py:pipeline",
            "--input",
            json.dumps({"gates": str(gates)}),
            "--json",
            env=env,
        ) as run,
        sync_playwright() as playwright,
    ):
        url = _url_of(server)
        running = _running_pipeline(url)
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(LIVE_TIMEOUT)

        # When a person signs in, they see every session
        page.goto(f"{url}/")
        expect(page).to_have_url(re.compile(r"/login\?next="))
        page.get_by_label("Token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        rows = page.locator("table.sessions tbody tr")
        expect(rows).to_have_count(7)
        page.screenshot(path=artifacts / "sessions.png", full_page=True)

        # ... filter them by workflow, status and tag
        page.get_by_label("Workflow").select_option("invoice")
        page.get_by_role("button", name="Filter").click()
        expect(rows).to_have_count(2)
        page.get_by_label("Status").select_option("failed")
        page.get_by_role("button", name="Filter").click()
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-session", filled.failed)
        page.get_by_role("link", name="Clear").click()
        page.get_by_label("Tag").fill("urgent")
        page.get_by_role("button", name="Filter").click()
        expect(rows).to_have_count(1)

        # ... open a session and see a bar per attempt on its timeline
        rows.first.get_by_role("link").click()
        expect(page).to_have_url(f"{url}/sessions/{filled.completed}")
        attempts = page.locator("svg.timeline rect.attempt")
        expect(attempts).to_have_count(3)
        expect(page.locator("svg.timeline rect.failed[data-step='charge']")).to_have_count(1)
        expect(page.locator("svg.timeline rect.retry")).to_have_count(1)
        expect(page.locator("#state")).to_contain_text("<script>alert('stepvault')</script>")
        page.screenshot(path=artifacts / "session.png", full_page=True)

        # ... and watch the running one advance, without reloading the page
        page.goto(f"{url}/sessions/{running}")
        expect(page.locator("#steps-done")).to_contain_text("0 of 3")
        page.evaluate("window.stayedOnThisPage = true")
        open_gate(gates, "extract")
        expect(page.locator("#steps-done")).to_contain_text("1 of 3")
        extract = page.locator("svg.timeline rect.ok.attempt[data-step='extract']")
        expect(extract).to_have_count(1)
        expect(page.locator("svg.timeline rect.running[data-step='transform']")).to_have_count(1)
        expect(page.locator("#live-state")).to_contain_text("live")
        page.screenshot(path=artifacts / "session-live.png", full_page=True)
        open_gate(gates, "transform")
        open_gate(gates, "load")
        expect(page.locator("#status")).to_have_text("completed")
        expect(page.locator("svg.timeline rect.ok.attempt")).to_have_count(3)
        assert page.evaluate("window.stayedOnThisPage") is True

        # ... and the overview's charts
        page.get_by_role("link", name="Overview").click()
        expect(page.locator("#total")).to_have_text("7")
        expect(page.locator("svg.chart.columns rect.column")).to_have_count(60)
        page.screenshot(path=artifacts / "overview.png", full_page=True)
        browser.close()

        # Then the run process finished the session the page watched
        assert run.wait(timeout=30) == 0

    for name in ("sessions", "session", "session-live", "overview"):
        assert (artifacts / f"{name}.png").stat().st_size > 10_000
