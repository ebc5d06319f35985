"""Who may look and who may act: the token, the sign-in cookie, CSRF tokens, the Host check.

Without a token the dashboard is read-only and answers only on loopback, to
requests whose ``Host`` names a loopback address (so a web page elsewhere cannot
reach it by DNS rebinding). With a token every page and API route needs it (the
sign-in cookie, or ``Authorization: Bearer TOKEN``), and the actions are on; each
action also needs the CSRF token of the form it came from.

The cookie and the CSRF token are HMACs under a secret made when the server
starts, so neither reveals the token, and a restart signs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping

from starlette.requests import Request

from ..errors import EngineError, InvalidArgumentError

COOKIE = "stepvault_ui"
MIN_TOKEN_LENGTH = 16
MAKE_TOKEN = "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"  # noqa: S105  # a command, not a secret


class AccessDeniedError(EngineError):
    """Raised when a request lacks the token or the CSRF token an action needs."""


def check_token(token: str | None) -> str | None:
    """Return a usable token, None for none; refuse one too short to be a secret.

    Raises:
        InvalidArgumentError: the token is shorter than 16 characters or has spaces.
    """
    if token is None or token == "":
        return None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise InvalidArgumentError(
            f"the dashboard token must be at least {MIN_TOKEN_LENGTH} characters without "
            f"spaces; make one with: {MAKE_TOKEN}"
        )
    return token


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` (a name or an address) is this machine's loopback."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token.

    Raises:
        EngineError: ``host`` is not a loopback address and there is no token.
    """
    if token is None and not is_loopback(host):
        raise EngineError(
            f"refusing to serve the dashboard on {host} without a token: anyone who can "
            "reach it could read every session; give --token (or STEPVAULT_UI_TOKEN), "
            "or bind 127.0.0.1"
        )


def host_name(header: str) -> str:
    """Return the host part of a ``Host`` header (``[::1]:8780`` -> ``::1``)."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, _, _ = header.partition(":")
    return name


class Guard:
    """Checks one server's requests against its token (or the lack of one)."""

    def __init__(self, token: str | None) -> None:
        self.token = check_token(token)
        self._secret = secrets.token_bytes(32)
        self._pass = None if self.token is None else self._sign("signed-in", self.token)

    @property
    def actions_enabled(self) -> bool:
        """Tell whether the actions are on (a token was given)."""
        return self.token is not None

    def _sign(self, purpose: str, value: str) -> str:
        message = f"{purpose}\0{value}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def host_allowed(self, request: Request) -> bool:
        """Tell whether the request's ``Host`` is acceptable (loopback, without a token)."""
        if self.token is not None:
            return True
        return is_loopback(host_name(request.headers.get("host", "")))

    def signed_in(self, request: Request) -> bool:
        """Tell whether the request carries the token (always true without one)."""
        if self.token is None or self._pass is None:
            return True
        cookie = request.cookies.get(COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), self._pass.encode()):
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.matches(given.strip())

    def matches(self, given: str) -> bool:
        """Tell whether ``given`` is the token, in constant time."""
        if self.token is None:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def cookie_value(self) -> str:
        """Return what the sign-in cookie holds (never the token itself)."""
        if self._pass is None:
            raise AccessDeniedError("this dashboard has no token to sign in with")
        return self._pass

    def csrf_token(self) -> str:
        """Return the CSRF token forms carry ("" when actions are off)."""
        return "" if self._pass is None else self._sign("csrf", self._pass)

    def check_action(self, request: Request, form: Mapping[str, object]) -> None:
        """Let an action through only with the token and the form's CSRF token.

        Raises:
            AccessDeniedError: actions are off, the request lacks the token, its
                CSRF token is missing or wrong, or it comes from another origin.
        """
        if self.token is None:
            raise AccessDeniedError(
                "actions are off: start the dashboard with --token or STEPVAULT_UI_TOKEN"
            )
        if not self.signed_in(request):
            raise AccessDeniedError("sign in with the dashboard's token first")
        origin = request.headers.get("origin")
        if origin is not None and origin != _origin_of(request):
            raise AccessDeniedError(f"refused an action sent from another site ({origin[:80]})")
        given = form.get("csrf")
        if not isinstance(given, str) or not hmac.compare_digest(
            given.encode(), self.csrf_token().encode()
        ):
            raise AccessDeniedError(
                "the form's CSRF token is missing or out of date: reload the page and try again"
            )


def _origin_of(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"
