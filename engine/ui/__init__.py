"""The web dashboard served by ``stepvault ui``: sessions, timelines, analytics, actions.

Needs the ``ui`` extra (``pip install 'stepvault[ui]'``). ``create_app(store)``
returns the ASGI app; see docs/dashboard.md.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
