"""The web dashboard over HTTP: every page and API route, escaping, the token and CSRF checks.

The store is a real FileStore filled by real workflow runs (``ui_support.fill``);
the app is served in-process through httpx's ASGI transport with its lifespan, so
its own runner carries out the actions. ``stepvault ui`` itself runs as a real
process where only a process shows it (binding, stopping, the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import html as html_module
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner
from ui_support import HOSTILE, Filled, fill, open_gate, pipeline, wait_for_status

from engine import FileStore, Runner, SessionManager, StepContext, Workflow
from engine.cli import app as cli_app
from engine.crypto import generate_key
from engine.ui import create_app
from engine.ui.listing import LOAD_BATCH

ROOT = Path(__file__).resolve().parents[1]
BASE = "http://127.0.0.1:8780"
TOKEN = "a-long-dashboard-token-for-tests"  # noqa: S105  # the tests' own
ESCAPED = "&lt;script&gt;alert("
ACTIONS = ["resume", "cancel", "event", "remove"]


@pytest.fixture(scope="module")
def filled_once(tmp_path_factory: pytest.TempPathFactory) -> Filled:
    """Run the workflows once per module; each test gets its own copy."""
    return asyncio.run(fill(tmp_path_factory.mktemp("filled") / "sessions"))


@pytest.fixture
def filled(filled_once: Filled, tmp_path: Path) -> Filled:
    """A private copy of the filled store: actions may change it."""
    folder = tmp_path / "sessions"
    shutil.copytree(filled_once.folder, folder)
    return Filled(
        folder,
        filled_once.completed,
        filled_once.failed,
        filled_once.waiting,
        filled_once.cancelled,
        filled_once.plain,
        filled_once.expired,
    )


@contextlib.asynccontextmanager
async def serve(
    folder: Path, *, token: str | None = None, key: str | None = None, store: Any = None
) -> AsyncIterator[httpx.AsyncClient]:
    """Serve the dashboard over ``folder`` and yield a client for it."""
    app = create_app(store or FileStore(folder, encryption_key=key), token=token)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            yield client


@pytest.fixture
async def client(filled: Filled) -> AsyncIterator[httpx.AsyncClient]:
    """A read-only dashboard (no token)."""
    async with serve(filled.folder) as served:
        yield served


@pytest.fixture
async def guarded(filled: Filled) -> AsyncIterator[httpx.AsyncClient]:
    """A dashboard started with a token; the client is not signed in."""
    async with serve(filled.folder, token=TOKEN) as served:
        yield served


async def sign_in(client: httpx.AsyncClient) -> str:
    """Sign in with the token as a browser does; return the CSRF token pages carry."""
    response = await client.post("/login", data={"token": TOKEN, "next": "/"})
    assert response.status_code == 303, response.text
    page = await client.get("/")
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found is not None, "a signed-in page carries a CSRF token"
    return found.group(1)


def listed(html: str) -> list[str]:
    """Return the session ids of a sessions page's table rows, in order."""
    return re.findall(r'<tr class="status-[a-z]+" data-session="([0-9a-f-]{36})"', html)


async def load(filled: Filled, session_id: str) -> Any:
    store = FileStore(filled.folder)
    try:
        return await store.load(session_id)
    finally:
        await store.close()


# -- the sessions page ----------------------------------------------------------------


async def test_sessions_page_shows_every_session_with_its_columns(
    client: httpx.AsyncClient, filled: Filled
) -> None:
    response = await client.get("/")

    assert response.status_code == 200
    assert set(listed(response.text)) == filled.all
    html = response.text
    completed_row = html.split(f'data-session="{filled.completed}"')[1].split("</tr>")[0]
    assert "invoice" in completed_row
    assert ">completed<" in completed_row
    assert ">2/2<" in completed_row  # steps done / total
    assert "urgent" in completed_row
    assert "vip" in completed_row
    assert len(re.findall(r">(just now|\d+s ago)<", completed_row)) == 2  # created, last activity
    assert re.search(r">6d 23h<", completed_row)  # expires in: a week's TTL
    expired_row = html.split(f'data-session="{filled.expired}"')[1].split("</tr>")[0]
    assert "expired 1h 0m ago" in expired_row
    assert "6 matching · 6 stored" in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=completed", {"completed"}),
        ("status=pending", {"plain", "expired"}),
        ("status=waiting&status=cancelled", {"waiting", "cancelled"}),
        ("workflow=invoice", {"completed", "failed"}),
        ("tag=urgent", {"completed"}),
        ("tag=analysis", {"plain"}),
        ("tag=urgent,vip", {"completed"}),
        ("tag=urgent&tag=refunds", set()),
        ("expiring_within=300", {"plain"}),
        ("workflow=invoice&status=failed&tag=refunds", {"failed"}),
    ],
)
async def test_sessions_page_filters(
    client: httpx.AsyncClient, filled: Filled, query: str, expected: set[str]
) -> None:
    names = {getattr(filled, name): name for name in ("completed", "failed", "waiting")}
    names |= {getattr(filled, name): name for name in ("cancelled", "plain", "expired")}

    page = await client.get(f"/?{query}")
    api = await client.get(f"/api/sessions?{query}")

    assert page.status_code == 200
    assert {names[i] for i in listed(page.text)} == expected
    assert {names[row["id"]] for row in api.json()["sessions"]} == expected
    assert api.json()["matched"] == len(expected)


async def test_sessions_page_pages_newest_activity_first(
    client: httpx.AsyncClient, filled: Filled
) -> None:
    pages = [await client.get(f"/?per_page=4&page={n}") for n in (1, 2, 3)]

    first, second = listed(pages[0].text), listed(pages[1].text)
    assert len(first) == 4
    assert len(second) == 2
    assert set(first + second) == filled.all
    assert listed(pages[2].text) == []
    assert "page 1 of 2" in pages[0].text
    assert 'href="/?page=2&amp;per_page=4"' in pages[0].text  # the pager keeps the filters
    rows = (await client.get("/api/sessions?per_page=6")).json()["sessions"]
    activity = [row["last_activity"] for row in rows]
    assert activity == sorted(activity, reverse=True)
    assert [row["id"] for row in rows] == first + second


class CountingStore(FileStore):
    """A FileStore that counts the sessions loaded whole (listing rows are not loads)."""

    loads = 0

    async def load(self, session_id: str) -> Any:
        """Count, then load."""
        CountingStore.loads += 1
        return await super().load(session_id)


async def test_sessions_page_loads_only_the_sessions_it_shows(tmp_path: Path) -> None:
    # Given 150 sessions, all tagged "batch"
    folder = tmp_path / "sessions"
    async with SessionManager(FileStore(folder, durability="none")) as manager:
        for _ in range(150):
            await manager.create_session(metadata={"tags": ["batch"]})

    # When pages of 10 are drawn, without and with a tag filter
    async with serve(folder, store=CountingStore(folder)) as served:
        CountingStore.loads = 0
        first = await served.get("/?per_page=10")
        plain_loads, CountingStore.loads = CountingStore.loads, 0
        tagged = await served.get("/?per_page=10&tag=batch")
        tagged_loads, CountingStore.loads = CountingStore.loads, 0
        last = await served.get("/api/sessions?per_page=10&tag=batch&page=15")
        last_loads = CountingStore.loads

    # Then only the page's sessions were loaded; a tag filter stopped once it had enough
    assert len(listed(first.text)) == 10
    assert "page 1 of 15<" in first.text
    assert plain_loads == 10
    assert len(listed(tagged.text)) == 10
    assert tagged_loads == LOAD_BATCH
    assert f"at least {LOAD_BATCH} matching" in tagged.text
    assert f"page 1 of {math.ceil(LOAD_BATCH / 10)} or more" in tagged.text
    assert last_loads == 150
    assert len(last.json()["sessions"]) == 10
    assert last.json()["matched"] == 150
    assert last.json()["matched_exact"] is True


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=finished", "unknown status finished"),
        ("page=0", "page must be at least 1"),
        ("per_page=100000", "per_page must be between 1 and 500"),
        ("expiring_within=soon", "expiring_within must be a number of seconds"),
        ("expiring_within=1e300", "expiring_within must be between 0 and"),
    ],
)
async def test_bad_filters_are_a_clear_400(
    client: httpx.AsyncClient, query: str, message: str
) -> None:
    page = await client.get(f"/?{query}")
    api = await client.get(f"/api/sessions?{query}")

    assert page.status_code == 400
    assert message in page.text
    assert api.status_code == 400
    assert message in api.json()["error"]


async def test_an_unreadable_session_is_listed_first_and_explained(
    client: httpx.AsyncClient, filled: Filled
) -> None:
    snapshot = filled.folder / filled.completed / "snapshot"
    snapshot.write_bytes(snapshot.read_bytes()[:-3] + b"xyz")

    listing = await client.get("/")
    page = await client.get(f"/sessions/{filled.completed}")
    api = await client.get(f"/api/sessions/{filled.completed}")

    assert listed(listing.text)[0] == filled.completed
    assert "unreadable" in listing.text.split(f'data-session="{filled.completed}"')[1]
    assert page.status_code == 200
    assert "Unreadable" in page.text
    assert api.json()["problem"]
    assert api.json()["session"] is None
    assert api.json()["locked"] is False


# -- the session page -------------------------------------------------------------------


async def test_session_page_shows_everything_about_a_session(
    client: httpx.AsyncClient, filled: Filled
) -> None:
    response = await client.get(f"/sessions/{filled.completed}")

    assert response.status_code == 200
    html = response.text
    assert "invoice" in html
    assert "version 2" in html
    assert "2 of 2" in html
    assert "(charge, receipt)" in html
    shown = html_module.unescape(html)
    assert '"charged": 42' in shown  # state, as formatted JSON
    assert '"urgent",' in shown  # metadata
    assert '"permissions": []' in shown  # context
    history = html.split('<table class="history">')[1].split("</table>")[0]
    assert history.count("<tr class=") == 4  # two charge attempts, a tool call, the receipt
    assert "ConnectionError: bank timeout" in history
    assert "fraud_check" in history


async def test_timeline_has_a_bar_per_attempt_coloured_by_outcome(
    client: httpx.AsyncClient, filled: Filled
) -> None:
    response = await client.get(f"/sessions/{filled.completed}")

    svg = response.text.split('<svg class="timeline"')[1].split("</svg>")[0]
    attempts = re.findall(r'<rect class="bar (\w+) attempt"[^>]*data-step="(\w+)"', svg)
    assert attempts == [("failed", "charge"), ("ok", "charge"), ("ok", "receipt")]
    assert re.search(r'class="bar retry"[^>]*data-step="charge"', svg)  # the backoff
    assert re.search(r'class="bar tool"[^>]*data-step="charge"', svg)  # fraud_check
    assert "charge \u00d72" in svg  # the lane says it took two attempts


async def test_a_long_session_page_stays_bounded(tmp_path: Path) -> None:
    # Given a finished session of 80 steps, each making 6 tool calls (560 history entries)
    workflow = Workflow("long")
    for index in range(80):

        async def step(ctx: StepContext, value: int) -> int:
            for call in range(6):
                await ctx.tool(f"call{call}", abs, value)
            return value

        workflow.step(name=f"s{index:02d}")(step)
    folder = tmp_path / "sessions"
    async with Runner(FileStore(folder, durability="none"), workflows=[workflow]) as runner:
        session_id = await runner.start(workflow, 1)
        await runner.wait(session_id)

    # When its page is drawn
    async with serve(folder) as served:
        page = (await served.get(f"/sessions/{session_id}")).text

    # Then it draws the last 60 steps and the last 500 history entries, and says so
    svg = page.split('<svg class="timeline"')[1].split("</svg>")[0]
    assert svg.count('<g class="lane">') == 60
    assert ">s20<" in svg
    assert ">s19<" not in svg
    assert "20 earlier step(s) not drawn" in page
    history = page.split('<table class="history">')[1].split("</table>")[0]
    assert history.count("<tr class=") == 500
    assert '<td class="num">560</td>' in history  # the last of 80 x 7 entries, numbered as stored
    assert f"/api/sessions/{session_id}</a> has them all" in page


async def test_a_waiting_session_shows_what_it_waits_for(
    client: httpx.AsyncClient, filled: Filled
) -> None:
    response = await client.get(f"/sessions/{filled.waiting}")

    assert "event <code>approve</code> in step <code>ask</code>" in response.text
    svg = response.text.split('<svg class="timeline"')[1].split("</svg>")[0]
    assert re.search(r'class="bar waiting"[^>]*data-step="ask"', svg)
    assert 'data-active="true"' in response.text  # it is followed live


async def test_every_value_from_a_session_is_shown_as_text(
    client: httpx.AsyncClient, filled: Filled
) -> None:
    completed = await client.get(f"/sessions/{filled.completed}")  # metadata and state
    failed = await client.get(f"/sessions/{filled.failed}")  # the step's error
    live = await client.get(f"/sessions/{filled.failed}/live")
    listing = await client.get("/")

    for response in (completed, failed, live, listing):
        assert response.status_code == 200
        assert "<script>alert" not in response.text
    assert completed.text.count(ESCAPED) >= 2  # metadata.origin, state.note
    error = failed.text.split('id="session-error">')[1].split("</td>")[0]
    assert error == "step &#39;receipt&#39;: ValueError: refund refused: " + (
        "&lt;script&gt;alert(&#39;stepvault&#39;)&lt;/script&gt;"
    )
    svg = failed.text.split('<svg class="timeline"')[1].split("</svg>")[0]
    assert ESCAPED in svg  # the failed attempt's tooltip
    assert ESCAPED in live.text
    assert completed.headers["content-security-policy"].startswith("default-src 'none'")
    assert completed.headers["x-content-type-options"] == "nosniff"


async def test_unknown_and_malformed_ids_are_404(client: httpx.AsyncClient) -> None:
    for session_id in ("00000000-0000-4000-8000-000000000000", "..%2F..%2Fetc", "nope"):
        page = await client.get(f"/sessions/{session_id}")
        api = await client.get(f"/api/sessions/{session_id}")
        assert page.status_code == 404
        assert api.status_code == 404
        assert api.json()["error"]


async def test_the_page_of_a_running_session_follows_it_live(
    client: httpx.AsyncClient, filled: Filled, tmp_path: Path
) -> None:
    # Given a pipeline running in another runner, its first step held at its gate
    gates = tmp_path / "gates"
    async with Runner(FileStore(filled.folder), workflows=[pipeline]) as runner:
        session_id = await runner.start(pipeline, {"gates": str(gates)})
        await wait_for_status(runner.store, session_id, "running")
        page = await client.get(f"/sessions/{session_id}")
        revision = re.search(r'data-revision="(\d+)"', page.text)
        assert revision is not None
        assert 'data-active="true"' in page.text
        live = f"/sessions/{session_id}/live?revision={revision.group(1)}"
        unchanged = await client.get(live)

        # When its steps finish one by one
        open_gate(gates, "extract")
        advanced = await _changed(client, live)
        open_gate(gates, "transform")
        open_gate(gates, "load")
        assert (await runner.wait(session_id))["gates"] == str(gates)
        finished = await client.get(f"/sessions/{session_id}/live")

    # Then the fragment changed with each checkpoint, and says when it is over
    assert unchanged.status_code == 204
    assert unchanged.headers["x-active"] == "true"
    assert "1 of 3" in advanced.text
    assert re.search(r'class="bar ok attempt"[^>]*data-step="extract"', advanced.text)
    assert re.search(r'class="bar running"[^>]*data-step="transform"', advanced.text)
    assert finished.headers["x-active"] == "false"
    assert "3 of 3" in finished.text
    assert ">completed<" in finished.text


async def _changed(client: httpx.AsyncClient, url: str, within: float = 15) -> httpx.Response:
    """Poll a live fragment until it has changed; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        response = await client.get(url)
        if response.status_code == 200:
            return response
        assert response.status_code == 204
        assert time.monotonic() < deadline, "the live fragment never changed"
        await asyncio.sleep(0.02)


# -- the overview and the API -----------------------------------------------------------


async def test_overview_shows_the_analytics_and_checkpoints_per_minute(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/overview")

    assert response.status_code == 200
    html = response.text
    assert '<span class="value" id="total">6</span>' in html
    assert '<span class="value" id="active">5</span>' in html  # the expired one is not
    # tool history: charge x3 (two attempts of one, one of the other), fraud_check x2,
    # receipt x2, extract x1 (the cancelled pipeline's attempt)
    assert '<span class="value" id="checkpoints">8</span>' in html
    tools = html.split('class="chart bars tool"')[1].split("</svg>")[0]
    assert re.findall(r"<title>([\w ]+): (\d+)</title>", tools) == [
        ("charge", "3"),
        ("fraud_check", "2"),
        ("receipt", "2"),
        ("extract", "1"),
    ]
    statuses = html.split('class="chart bars status"')[1].split("</svg>")[0]
    assert "<title>pending: 2</title>" in statuses
    assert html.count('<rect class="column"') == 60  # one per minute of the last hour


async def test_api_lists_and_shows_sessions_and_metrics(
    client: httpx.AsyncClient, filled: Filled
) -> None:
    listing = (await client.get("/api/sessions")).json()
    one = (await client.get(f"/api/sessions/{filled.completed}")).json()
    metrics = (await client.get("/api/metrics")).json()
    stored = await load(filled, filled.completed)

    assert listing["matched"] == listing["stored"] == 6
    assert listing["pages"] == 1
    assert listing["page"] == 1
    assert listing["per_page"] == 50
    row = next(r for r in listing["sessions"] if r["id"] == filled.completed)
    assert row["status"] == "completed"
    assert row["workflow"] == "invoice"
    assert (row["steps_done"], row["steps_total"]) == (2, 2)
    assert row["tags"] == ["urgent", "vip"]
    assert row["expired"] is False
    assert row["locked"] is False
    assert one["session"] == json.loads(stored.model_dump_json())
    assert one["session"]["state"]["note"] == HOSTILE  # JSON carries data as it is
    assert metrics["total_sessions"] == 6
    assert metrics["active_sessions"] == 5
    assert metrics["tool_usage_stats"] == {
        "charge": 3,
        "fraud_check": 2,
        "receipt": 2,
        "extract": 1,
    }
    assert len(metrics["checkpoints_per_minute"]) == 60
    assert sum(m["checkpoints"] for m in metrics["checkpoints_per_minute"]) == 8


async def test_an_encrypted_store_without_its_key_shows_only_clear_fields(
    tmp_path: Path,
) -> None:
    # Given an encrypted store holding a finished workflow run with a secret in its state
    key, folder = generate_key(), tmp_path / "sessions"
    async with SessionManager(FileStore(folder, encryption_key=key)) as manager:
        session = await manager.create_session(
            {"user_id": "patient-7"}, metadata={"tags": ["vip"]}, state={"diagnosis": "secret"}
        )

    # When the dashboard is started without the key, then with it
    async with serve(folder) as keyless:
        listing = await keyless.get("/")
        page = await keyless.get(f"/sessions/{session.id}")
        api = (await keyless.get(f"/api/sessions/{session.id}")).json()
        tagged = await keyless.get("/api/sessions?tag=vip")
    async with serve(folder, key=key) as keyed:
        readable = await keyed.get(f"/sessions/{session.id}")

    # Then it shows the id, says which fields are locked, and nothing of the rest
    assert listed(listing.text) == [session.id]
    assert ">locked<" in listing.text
    assert "Locked" in page.text
    assert "this dashboard was started without its key" in page.text
    for field in ("status", "workflow", "metadata and tags", "context", "state", "tool history"):
        assert field in page.text.split('class="locked-list">')[1].split("</span>")[0]
    for response in (listing, page):
        assert "secret" not in response.text
        assert "patient-7" not in response.text
    assert api["locked"] is True
    assert api["session"] is None
    assert "state" in api["locked_fields"]
    assert api["status"] is None
    assert tagged.json()["sessions"] == []  # its tags are locked too
    assert '"diagnosis": "secret"' in html_module.unescape(readable.text)


# -- without a token: read-only, loopback only -------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
async def test_without_a_token_actions_are_off(
    client: httpx.AsyncClient, filled: Filled, action: str
) -> None:
    page = await client.get(f"/sessions/{filled.waiting}")

    response = await client.post(
        f"/sessions/{filled.waiting}/{action}", data={"csrf": "", "name": "approve"}
    )

    assert 'action="/sessions/' not in page.text  # no action is offered
    assert "read-only" in page.text
    assert response.status_code == 403
    assert "actions are off" in response.text
    session = await load(filled, filled.waiting)
    assert session.status == "waiting"
    assert session.inbox == []


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:8780", 200),
        ("localhost:8780", 200),
        ("[::1]:8780", 200),
        ("127.0.0.2", 200),
        ("stepvault.example:8780", 400),
        ("192.168.1.20:8780", 400),
    ],
)
async def test_without_a_token_only_loopback_host_names_are_answered(
    client: httpx.AsyncClient, host: str, status: int
) -> None:
    # A page elsewhere that rebinds its own name to 127.0.0.1 sends its own name as Host.
    response = await client.get("/api/sessions", headers={"host": host})

    assert response.status_code == status


# -- with a token: every page needs it; every action needs it and a CSRF token -----------


async def test_with_a_token_every_page_and_api_route_needs_it(
    guarded: httpx.AsyncClient, filled: Filled
) -> None:
    pages = ["/", "/overview", f"/sessions/{filled.completed}", f"/sessions/{filled.waiting}/live"]
    apis = ["/api/sessions", f"/api/sessions/{filled.completed}", "/api/metrics"]

    for path in pages:
        response = await guarded.get(path)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/login?next=%2F")
    for path in apis:
        assert (await guarded.get(path)).status_code == 401
        wrong = {"authorization": f"Bearer {TOKEN}x"}
        assert (await guarded.get(path, headers=wrong)).status_code == 401
        right = {"authorization": f"Bearer {TOKEN}"}
        assert (await guarded.get(path, headers=right)).status_code == 200
    assert (await guarded.get("/static/dashboard.js")).status_code == 200
    assert (await guarded.get("/login")).status_code == 200


async def test_signing_in_sets_a_cookie_that_is_not_the_token(guarded: httpx.AsyncClient) -> None:
    wrong = await guarded.post("/login", data={"token": "not-the-token-at-all", "next": "/"})
    assert wrong.status_code == 403
    assert "not the dashboard" in wrong.text
    assert "stepvault_ui" not in guarded.cookies

    right = await guarded.post("/login", data={"token": TOKEN, "next": "/overview"})

    assert right.status_code == 303
    assert right.headers["location"] == "/overview"
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert TOKEN not in cookie
    assert (await guarded.get("/overview")).status_code == 200


async def test_sign_in_only_redirects_within_the_site(guarded: httpx.AsyncClient) -> None:
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        response = await guarded.post("/login", data={"token": TOKEN, "next": target})
        assert response.headers["location"] == "/"


@pytest.mark.parametrize("action", ACTIONS)
async def test_every_action_checks_the_token_and_the_csrf_token(
    guarded: httpx.AsyncClient, filled: Filled, action: str
) -> None:
    url = f"/sessions/{filled.waiting}/{action}"
    form = {"name": "approve", "payload": "{}"}

    # Given someone without the token
    anonymous = await guarded.post(url, data={**form, "csrf": "0" * 64})
    # When signed in, but with no CSRF token, a wrong one, or from another site
    csrf = await sign_in(guarded)
    missing = await guarded.post(url, data=form)
    altered = csrf[:-1] + ("1" if csrf.endswith("0") else "0")
    wrong = await guarded.post(url, data={**form, "csrf": altered})
    foreign = await guarded.post(
        url, data={**form, "csrf": csrf}, headers={"origin": "https://evil.example"}
    )

    # Then nothing was done
    assert anonymous.status_code == 303
    assert anonymous.headers["location"].startswith("/login")
    for refused in (missing, wrong, foreign):
        assert refused.status_code == 403
    assert "CSRF" in missing.text
    assert "another site" in foreign.text
    session = await load(filled, filled.waiting)
    assert session is not None
    assert session.status == "waiting"
    assert session.inbox == []


async def test_send_an_event_then_resume_finishes_a_waiting_session(
    guarded: httpx.AsyncClient, filled: Filled
) -> None:
    # Given a session waiting for "approve"
    csrf = await sign_in(guarded)
    page = await guarded.get(f"/sessions/{filled.waiting}")
    assert f'action="/sessions/{filled.waiting}/event"' in page.text

    # When the event is sent, then the session resumed, from the page's forms
    sent = await guarded.post(
        f"/sessions/{filled.waiting}/event",
        data={"csrf": csrf, "name": "approve", "payload": '{"approved": true}'},
    )
    inbox = (await load(filled, filled.waiting)).inbox
    resumed = await guarded.post(f"/sessions/{filled.waiting}/resume", data={"csrf": csrf})
    store = FileStore(filled.folder)
    await wait_for_status(store, filled.waiting, "completed")
    await store.close()

    # Then the event was stored, and the dashboard's runner finished the session with it
    assert sent.status_code == 303
    assert sent.headers["location"] == f"/sessions/{filled.waiting}?notice=event-sent"
    assert [(e.name, e.payload) for e in inbox] == [("approve", {"approved": True})]
    assert resumed.status_code == 303
    assert (await guarded.get(resumed.headers["location"])).text.count("Resumed") == 1
    session = await load(filled, filled.waiting)
    assert session.outputs["decide"] == "approved"
    assert session.state == {"approved": True}
    svg = (await guarded.get(f"/sessions/{filled.waiting}")).text.split("<svg")[1]
    assert re.search(r'class="bar wait"[^>]*data-step="ask"><title>ask: waited for event', svg)
    assert re.search(r'class="bar event"[^>]*data-step="ask"', svg)  # when it took the event


async def test_cancel_and_remove_act_on_the_store(
    guarded: httpx.AsyncClient, filled: Filled
) -> None:
    csrf = await sign_in(guarded)

    cancelled = await guarded.post(f"/sessions/{filled.waiting}/cancel", data={"csrf": csrf})
    removed = await guarded.post(f"/sessions/{filled.expired}/remove", data={"csrf": csrf})

    assert cancelled.status_code == 303
    assert (await load(filled, filled.waiting)).status == "cancelled"
    assert removed.status_code == 303
    assert removed.headers["location"] == "/?notice=removed"
    assert await load(filled, filled.expired) is None
    assert "Session removed." in (await guarded.get("/?notice=removed")).text


async def test_a_refused_action_says_why_on_the_session_page(
    guarded: httpx.AsyncClient, filled: Filled, tmp_path: Path
) -> None:
    csrf = await sign_in(guarded)
    gates = tmp_path / "gates"
    async with Runner(FileStore(filled.folder), workflows=[pipeline]) as runner:
        running = await runner.start(pipeline, {"gates": str(gates)})
        await wait_for_status(runner.store, running, "running")

        busy = await guarded.post(f"/sessions/{running}/remove", data={"csrf": csrf})
        no_name = await guarded.post(
            f"/sessions/{filled.waiting}/event", data={"csrf": csrf, "name": ""}
        )
        bad_json = await guarded.post(
            f"/sessions/{filled.waiting}/event",
            data={"csrf": csrf, "name": "approve", "payload": "{oops"},
        )
        done = await guarded.post(f"/sessions/{filled.completed}/resume", data={"csrf": csrf})
        open_gate(gates, "extract")
        open_gate(gates, "transform")
        open_gate(gates, "load")
        await runner.wait(running)

    assert busy.status_code == 409
    assert "cancel it before removing it" in busy.text
    assert no_name.status_code == 400
    assert "non-empty string" in no_name.text
    assert bad_json.status_code == 400
    assert "payload is not JSON" in bad_json.text
    assert done.status_code == 400
    assert "nothing to resume" in done.text
    for response in (busy, no_name, done):
        assert 'class="failure" role="alert"' in response.text
    assert await load(filled, running) is not None


async def test_sign_out_needs_the_csrf_token_and_ends_the_session(
    guarded: httpx.AsyncClient,
) -> None:
    csrf = await sign_in(guarded)

    refused = await guarded.post("/logout", data={"csrf": "nope"})
    out = await guarded.post("/logout", data={"csrf": csrf})

    assert refused.status_code == 403
    assert out.status_code == 303
    assert (await guarded.get("/")).status_code == 303  # back to the sign-in page


# -- the command ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "refusing to serve the dashboard on 0.0.0.0"),  # noqa: S104
        (["--host", "192.168.1.20"], "without a token"),
        (["--token", "short"], "at least 16 characters"),
        (["--store", "missing-folder"], "the folder does not exist"),
    ],
)
def test_ui_command_refuses_unsafe_or_broken_setups(
    filled_once: Filled, args: list[str], message: str, tmp_path: Path
) -> None:
    env = {"STEPVAULT_STORE": str(filled_once.folder), "STEPVAULT_UI_TOKEN": None}
    with contextlib.chdir(tmp_path):
        result = CliRunner(env=env).invoke(cli_app, ["ui", *args])

    assert result.exit_code == 1
    assert message in result.output


def test_ui_command_reports_a_busy_port(filled_once: Filled) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"STEPVAULT_STORE": str(filled_once.folder), "STEPVAULT_UI_TOKEN": None}
        result = CliRunner(env=env).invoke(cli_app, ["ui", "--port", str(port)])

    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


@contextlib.contextmanager
def ui_process(store: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``stepvault ui --port 0`` in a real process; yield its URL; stop it with SIGTERM."""
    command = [sys.executable, "-m", "engine.cli", "ui", "--store", str(store), "--port", "0"]
    environment = {**os.environ, "STEPVAULT_UI_TOKEN": "", **(env or {})}
    process = subprocess.Popen(
        [*command, *args], cwd=ROOT, env=environment, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        banner = process.stderr.readline()
        found = re.search(r"on (http://\S+) ", banner)
        assert found is not None, banner + process.stderr.read()
        yield found.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        finally:
            process.kill()
        assert process.stderr is not None
        with process.stderr:
            rest = process.stderr.read()
    assert code == 0, rest
    assert "dashboard stopped" in rest


def test_ui_process_serves_the_dashboard_on_loopback_and_stops_cleanly(
    filled_once: Filled,
) -> None:
    with ui_process(filled_once.folder) as url:
        sessions = httpx.get(f"{url}/api/sessions", timeout=10)
        page = httpx.get(f"{url}/overview", timeout=10)

    assert url.startswith("http://127.0.0.1:")
    assert sessions.json()["stored"] == 6
    assert page.status_code == 200
    assert "Checkpoints per minute" in page.text


def test_ui_process_takes_its_token_from_the_environment(filled_once: Filled) -> None:
    with ui_process(filled_once.folder, env={"STEPVAULT_UI_TOKEN": TOKEN}) as url:
        anonymous = httpx.get(f"{url}/api/metrics", timeout=10)
        bearer = httpx.get(
            f"{url}/api/metrics", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
        )

    assert anonymous.status_code == 401
    assert bearer.json()["total_sessions"] == 6
