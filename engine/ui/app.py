"""The dashboard's ASGI app: pages, the JSON API, the actions, and their guard.

Pages are rendered on the server by Jinja2 with autoescaping, so every value from
a session reaches the browser as text; the one script (``static/dashboard.js``)
only swaps in fragments the server rendered, and the Content-Security-Policy
allows no other.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .. import humanize
from ..errors import (
    EngineError,
    InvalidArgumentError,
    InvalidSessionIdError,
    SessionBusyError,
    SessionCancelledError,
    SessionExpiredError,
    SessionNotFoundError,
)
from ..models import UNFINISHED, utcnow
from ..runner import Runner
from ..stores import Store
from ..values import to_standard_json
from . import format as fmt
from . import listing, overview, timeline
from .actions import Actions
from .guard import COOKIE, AccessDeniedError, Guard

HERE = Path(__file__).resolve().parent
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
NOTICES = {
    "resumed": "Resumed: this dashboard is running the session now.",
    "cancelled": "Cancelled.",
    "event-sent": "Event sent: a runner waiting for it goes on; if none runs it, resume it.",
    "removed": "Session removed.",
    "signed-out": "Signed out.",
}
"""The messages an action's redirect may ask a page to show (by key: nothing is reflected)."""
HISTORY_ROWS = 500
"""Tool-history rows a session page shows (the latest); the API has them all."""
EXPIRY_CHOICES = [(300, "5 minutes"), (3600, "1 hour"), (86400, "1 day"), (604800, "1 week")]
_STATUS_CODES: list[tuple[type[EngineError], int]] = [
    (AccessDeniedError, 403),
    (InvalidSessionIdError, 404),
    (SessionNotFoundError, 404),
    (InvalidArgumentError, 400),
    (SessionBusyError, 409),
    (SessionCancelledError, 409),
    (SessionExpiredError, 410),
]


@dataclass
class Dashboard:
    """What the routes share: the store, the guard, the templates, the runner."""

    store: Store
    guard: Guard
    workflow_files: Sequence[Path]
    templates: Jinja2Templates = field(init=False)
    runner: Runner | None = None
    actions: Actions | None = None

    def __post_init__(self) -> None:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every template, whatever its name: values are text
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters.update(
            duration=fmt.duration,
            ago=humanize.ago,
            expires_in=fmt.expires_in,
            stamp=fmt.stamp,
            clock=fmt.clock,
            pretty_json=fmt.pretty_json,
            one_line_json=fmt.one_line_json,
        )
        self.templates = Jinja2Templates(env=env)

    def render(
        self, request: Request, name: str, context: dict[str, Any], status_code: int = 200
    ) -> Response:
        """Render a page with what every page needs."""
        notice = request.query_params.get("notice", "")
        common = {
            "now": utcnow(),
            "guard": self.guard,
            "signed_in": self.guard.signed_in(request),
            "csrf": self.guard.csrf_token(),
            "notice": NOTICES.get(notice),
            "unfinished": UNFINISHED,
            "history_rows": HISTORY_ROWS,
        }
        return self.templates.TemplateResponse(
            request, name, {**common, **context}, status_code=status_code
        )

    def started(self) -> tuple[Runner, Actions]:
        """Return the runner and the actions the lifespan made.

        Raises:
            EngineError: the app is served without its lifespan.
        """
        if self.runner is None or self.actions is None:
            raise EngineError("the dashboard is not started: serve it with its lifespan")
        return self.runner, self.actions


def create_app(
    store: Store, *, token: str | None = None, workflow_files: Sequence[Path] = ()
) -> Starlette:
    """Build the dashboard over ``store``; the app owns the store and closes it on shutdown.

    Args:
        store: where the sessions live.
        token: turns the actions on and guards every page with it; None for a
            read-only dashboard that answers loopback requests only.
        workflow_files: where ``resume`` finds workflow code (default: the file
            each session recorded).

    Raises:
        InvalidArgumentError: the token is too short to be a secret.
    """
    board = Dashboard(store, Guard(token), list(workflow_files))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # No cleanup sweep: removing expired sessions is `stepvault cleanup`'s job.
        async with Runner(store, cleanup_interval=None) as runner:
            board.runner = runner
            board.actions = Actions(runner, board.workflow_files)
            yield

    pages = _Pages(board)
    api = _Api(board)
    routes = [
        Route("/", pages.sessions, name="sessions"),
        Route("/overview", pages.overview, name="overview"),
        Route("/sessions/{session_id}", pages.session, name="session"),
        Route("/sessions/{session_id}/live", pages.live, name="live"),
        Route("/sessions/{session_id}/{action}", pages.act, methods=["POST"], name="act"),
        Route("/login", pages.login_form, name="login"),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"], name="logout"),
        Route("/api/sessions", api.sessions, name="api_sessions"),
        Route("/api/sessions/{session_id}", api.session, name="api_session"),
        Route("/api/metrics", api.metrics, name="api_metrics"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    guard_middleware = Middleware(BaseHTTPMiddleware, dispatch=_guarding(board))
    app = Starlette(routes=routes, middleware=[guard_middleware], lifespan=lifespan)
    app.add_exception_handler(EngineError, _error_handler(board))
    app.add_exception_handler(HTTPException, _error_handler(board))
    return app


def _guarding(
    board: Dashboard,
) -> Callable[[Request, RequestResponseEndpoint], Awaitable[Response]]:
    """Return the middleware: Host check, sign-in check, and the security headers."""

    async def dispatch(request: Request, call_next: RequestResponseEndpoint) -> Response:
        path = request.url.path
        response: Response
        if not board.guard.host_allowed(request):
            response = PlainTextResponse(
                "this dashboard answers only to a loopback Host (127.0.0.1, localhost); "
                "to serve it elsewhere, start it with a token",
                status_code=400,
            )
        elif board.guard.signed_in(request) or path == "/login" or path.startswith("/static/"):
            response = await call_next(request)
        elif path.startswith("/api/"):
            response = JSONResponse(
                {"error": "this dashboard needs its token: Authorization: Bearer TOKEN"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            login = "/login?next=" + urllib.parse.quote(target, safe="")
            response = RedirectResponse(login, status_code=303)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        if not path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    return dispatch


def _status_of(exc: EngineError) -> int:
    return next((code for kind, code in _STATUS_CODES if isinstance(exc, kind)), 500)


def _error_handler(board: Dashboard) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):  # no such route, or the wrong method
            status, message = exc.status_code, f"{exc.detail}: {request.url.path}"
        else:
            status = _status_of(exc) if isinstance(exc, EngineError) else 500
            message = str(exc)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        return board.render(request, "error.html", {"message": message}, status_code=status)

    return handle


class _Pages:
    """The HTML pages, and the actions' form posts."""

    def __init__(self, board: Dashboard) -> None:
        self.board = board

    async def sessions(self, request: Request) -> Response:
        filters = listing.Filters.parse(request.query_params)
        now = utcnow()
        page = await listing.list_sessions(self.board.store, filters, now)
        context = {
            "page": page,
            "filters": filters,
            "statuses": listing.FILTER_STATUSES,
            "expiry_choices": EXPIRY_CHOICES,
            "now": now,
        }
        return self.board.render(request, "sessions.html", context)

    async def session(self, request: Request) -> Response:
        row = await listing.session_row(self.board.store, request.path_params["session_id"])
        return self.board.render(request, "session.html", self._session_context(row))

    async def live(self, request: Request) -> Response:
        """Return the changing part of a session's page, or 204 if it has not changed."""
        row = await listing.session_row(self.board.store, request.path_params["session_id"])
        seen = request.query_params.get("revision")
        session = row.session
        if session is not None and seen == str(session.revision):
            return Response(status_code=204, headers=_live_headers(row))
        context = self._session_context(row)
        response = self.board.render(request, "_session_live.html", context)
        response.headers.update(_live_headers(row))
        return response

    def _session_context(self, row: listing.Row) -> dict[str, Any]:
        now = utcnow()
        session = row.session
        return {
            "row": row,
            "session": session,
            "timeline": None if session is None else timeline.build(session, now),
            "now": now,
        }

    async def overview(self, request: Request) -> Response:
        runner, _ = self.board.started()
        data = await overview.collect(runner.sessions, utcnow())
        return self.board.render(request, "overview.html", {"overview": data})

    async def act(self, request: Request) -> Response:
        """Carry out one action, after the guard's checks; then back to the page."""
        session_id = request.path_params["session_id"]
        action = request.path_params["action"]
        form = await request.form()
        self.board.guard.check_action(request, form)
        _, actions = self.board.started()
        row_url = f"/sessions/{session_id}"
        try:
            if action == "resume":
                await actions.resume(session_id)
                notice = "resumed"
            elif action == "cancel":
                await actions.cancel(session_id)
                notice = "cancelled"
            elif action == "event":
                await actions.send_event(session_id, _field(form, "name"), _field(form, "payload"))
                notice = "event-sent"
            elif action == "remove":
                await actions.remove(session_id)
                return RedirectResponse("/?notice=removed", status_code=303)
            else:
                return PlainTextResponse(f"no action {action[:40]!r}", status_code=404)
        except EngineError as exc:
            if isinstance(exc, (InvalidSessionIdError, SessionNotFoundError)):
                raise
            row = await listing.session_row(self.board.store, session_id)
            context = {**self._session_context(row), "failure": str(exc)}
            return self.board.render(request, "session.html", context, _status_of(exc))
        return RedirectResponse(f"{row_url}?notice={notice}", status_code=303)

    async def login_form(self, request: Request) -> Response:
        if not self.board.guard.actions_enabled:
            return RedirectResponse("/", status_code=303)
        context = {"next": _local(request.query_params.get("next")), "wrong": False}
        return self.board.render(request, "login.html", context)

    async def login(self, request: Request) -> Response:
        guard = self.board.guard
        form = await request.form()
        target = _local(_field(form, "next"))
        if not guard.matches(_field(form, "token")):
            context = {"next": target, "wrong": True}
            return self.board.render(request, "login.html", context, status_code=403)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            guard.cookie_value(),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        self.board.guard.check_action(request, form)
        response = RedirectResponse("/login?notice=signed-out", status_code=303)
        response.delete_cookie(COOKIE, httponly=True, samesite="strict")
        return response


class _Api:
    """The JSON API: the same data as the pages, for other tools."""

    def __init__(self, board: Dashboard) -> None:
        self.board = board

    async def sessions(self, request: Request) -> Response:
        filters = listing.Filters.parse(request.query_params)
        now = utcnow()
        page = await listing.list_sessions(self.board.store, filters, now)
        return JSONResponse(page.as_json(now))

    async def session(self, request: Request) -> Response:
        row = await listing.session_row(self.board.store, request.path_params["session_id"])
        now = utcnow()
        body: dict[str, Any] = row.as_json(now)
        body["session"] = None if row.session is None else to_standard_json(row.session)
        return JSONResponse(body)

    async def metrics(self, request: Request) -> Response:
        runner, _ = self.board.started()
        data = await overview.collect(runner.sessions, utcnow())
        return JSONResponse(data.as_json())


def _live_headers(row: listing.Row) -> dict[str, str]:
    session = row.session
    active = session is not None and session.status in UNFINISHED
    revision = "" if session is None else str(session.revision)
    return {"X-Revision": revision, "X-Active": "true" if active else "false"}


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _local(target: str | None) -> str:
    """Return ``target`` if it is a path on this site, else ``/`` (no open redirects)."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"
