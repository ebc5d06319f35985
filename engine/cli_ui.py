"""``stepvault ui``: serve the web dashboard (docs/dashboard.md) over any store.

The dashboard needs the ``ui`` extra; without it the command says which to install.
It listens on 127.0.0.1 unless told otherwise, and refuses any other address
without a token. With a token (``--token`` or ``STEPVAULT_UI_TOKEN``) every page
asks for it and the actions (resume, cancel, send an event, remove) are on.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from .cli_support import DEFAULT_STORE, StoreOption, open_cli_store
from .errors import EngineError
from .stores import FileStore, Store

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8780


def register(app: typer.Typer) -> None:
    """Add ``ui`` to the command line."""
    app.command("ui", rich_help_panel="Sessions")(ui)


def ui(
    store: StoreOption = DEFAULT_STORE,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; beyond loopback it needs a token.")
    ] = DEFAULT_HOST,
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free one).")
    ] = DEFAULT_PORT,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="STEPVAULT_UI_TOKEN",
            show_default=False,
            help="Secret that guards every page and turns on the actions "
            "(prefer the environment variable: a command line is visible to other users).",
        ),
    ] = None,
    workflow: Annotated[
        list[Path] | None,
        typer.Option(
            "--workflow",
            help="A file declaring the workflows the Resume button may run (repeatable); "
            "default: each session's recorded file.",
        ),
    ] = None,
) -> None:
    """Serve the web dashboard: sessions, step timelines, analytics; actions with a token."""
    try:
        import uvicorn  # noqa: PLC0415  # the optional extra, only for this command

        from .ui import create_app  # noqa: PLC0415
        from .ui.guard import check_bind, check_token  # noqa: PLC0415
    except ImportError as exc:
        raise EngineError(
            f"the dashboard needs the 'ui' extra ({exc.name} is missing): "
            "pip install 'stepvault[ui]'"
        ) from None
    secret = check_token(token)
    check_bind(host, secret)
    app = create_app(_open(store), token=secret, workflow_files=workflow or [])
    listener = _listen(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    url = _url(host, listener.getsockname()[1])
    mode = "token required; actions on" if secret else "read-only: actions need --token"
    typer.echo(f"stepvault dashboard on {url} ({mode}); Ctrl-C stops it", err=True)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM: uvicorn has shut down gracefully; stopping is no error
    finally:
        listener.close()
    typer.echo("stepvault dashboard stopped", err=True)


def _open(url: str) -> Store:
    """Open the store; a folder that does not exist is an error, not a new empty store."""
    store = open_cli_store(url)
    if isinstance(store, FileStore) and not store.path.is_dir():
        raise EngineError(
            f"no sessions at {store.path}: the folder does not exist "
            "(give the store with --store or STEPVAULT_STORE)"
        )
    return store


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket here, so a busy port is one clear error line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise EngineError(f"cannot listen on {host}: {exc.strerror}") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)  # connections queue from now on, while uvicorn starts
    except OSError as exc:
        listener.close()
        raise EngineError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return listener


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
