"""``stepvault verify`` and ``stepvault rekey``: integrity checks and key rotation.

Keys come from the environment: ``SESSION_ENCRYPTION_KEY`` is the active key
(base64 of 32 bytes, or a passphrase) and ``SESSION_ENCRYPTION_OLD_KEYS`` a
comma-separated list of keys that only read what was written before a rotation.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .cli_support import DEFAULT_STORE, JsonOption, StoreOption, dump_json, one_line, open_cli_store
from .codec import BAD_VERDICTS, Checking, SessionCheck
from .crypto import ENV_KEY, ENV_OLD_KEYS, KeyRing, Rekeying
from .errors import (
    CorruptSessionError,
    DecryptionError,
    EngineError,
    SessionNotFoundError,
    StorageError,
)
from .stores import Store

_T = TypeVar("_T")
_STYLES = {"ok": "green", "torn tail": "yellow", "rekeyed": "green", "current": "green"}


def register(app: typer.Typer) -> None:
    """Add ``verify`` and ``rekey`` to the ``stepvault`` command."""
    app.command()(verify)
    app.command()(rekey)


# -- verify ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Verified:
    check: SessionCheck
    moved_to: str | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "session_id": self.check.session_id,
            "verdict": self.check.verdict,
            "detail": self.check.detail,
        }
        if self.moved_to is not None:
            data["quarantined_to"] = self.moved_to
        return data


def verify(
    store: StoreOption = DEFAULT_STORE,
    quarantine: Annotated[
        bool,
        typer.Option(
            "--quarantine",
            help="Move corrupt sessions into the store's quarantine folder (never deleted; "
            "undecryptable sessions are never moved).",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Check every record of every session; exit 1 if any is corrupt or unreadable.

    Verdicts: ok; torn tail (an interrupted append that was never acknowledged:
    harmless); corrupt; undecryptable (a key is missing: nothing is changed);
    unreadable (permissions, I/O, a symlink in place).
    """
    results = _run(_verify(store, quarantine=quarantine))
    if json_output:
        typer.echo(dump_json([result.as_json() for result in results]))
    else:
        _print_checks(results)
    bad = [result for result in results if result.check.verdict in BAD_VERDICTS]
    if bad:
        counts = Counter(result.check.verdict for result in bad)
        summary = ", ".join(f"{count} {verdict}" for verdict, count in sorted(counts.items()))
        typer.echo(f"error: {len(bad)} of {len(results)} session(s) failed: {summary}", err=True)
        raise typer.Exit(1)


async def _verify(url: str, *, quarantine: bool) -> list[_Verified]:
    store = open_cli_store(url)  # the whole key ring: old keys read
    try:
        results = []
        for row in await store.list():
            try:
                check = await _check(store, row.id)
            except SessionNotFoundError:
                continue  # removed since it was listed
            moved_to = None
            if quarantine and check.verdict == "corrupt":
                if not isinstance(store, Checking):
                    raise EngineError(f"{type(store).__name__} cannot quarantine sessions")
                moved_to = await store.quarantine(row.id)
            results.append(_Verified(check, moved_to))
        return results
    finally:
        await store.close()


async def _check(store: Store, session_id: str) -> SessionCheck:
    """Check one session record by record, or, on a store that cannot, by loading it."""
    if isinstance(store, Checking):
        return await store.check(session_id)
    try:
        session = await store.load(session_id)
    except DecryptionError as exc:
        return SessionCheck(session_id, "undecryptable", str(exc))
    except CorruptSessionError as exc:
        return SessionCheck(session_id, "corrupt", str(exc))
    except StorageError as exc:
        return SessionCheck(session_id, "unreadable", str(exc))
    if session is None:
        raise SessionNotFoundError(f"session {session_id} not found")
    return SessionCheck(session_id, "ok")


def _print_checks(results: list[_Verified]) -> None:
    if not results:
        typer.echo("no sessions", err=True)
        return
    table = Table(title="stored sessions")
    table.add_column("session", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for result in results:
        detail = result.check.detail
        if result.moved_to is not None:
            detail = f"{detail}; moved to {result.moved_to}"
        verdict = result.check.verdict
        table.add_row(
            result.check.session_id,
            Text(verdict, style=_STYLES.get(verdict, "red")),
            Text(one_line(detail)),
        )
    Console().print(table)
    counts = Counter(result.check.verdict for result in results)
    typer.echo(", ".join(f"{count} {verdict}" for verdict, count in sorted(counts.items())))


# -- rekey -----------------------------------------------------------------------------


def rekey(store: StoreOption = DEFAULT_STORE, json_output: JsonOption = False) -> None:
    """Rewrite every session under the active key; safe to interrupt and run again.

    The new key is SESSION_ENCRYPTION_KEY; the keys sessions are under now go in
    SESSION_ENCRYPTION_OLD_KEYS (comma-separated). Sessions in clear are encrypted.
    Exits 1 if a session could not be rewritten (busy or unreadable): run it again.
    """
    if KeyRing.from_env() is None:
        raise EngineError(
            f"rekey needs the new key in {ENV_KEY} (and the current ones in {ENV_OLD_KEYS})"
        )
    outcomes = _run(_rekey(store))
    if json_output:
        typer.echo(
            dump_json([{"session_id": sid, "outcome": o, "detail": d} for sid, o, d in outcomes])
        )
    else:
        _print_outcomes(outcomes)
    left = [outcome for outcome in outcomes if outcome[1] not in ("rekeyed", "current")]
    if left:
        typer.echo(
            f"error: {len(left)} of {len(outcomes)} session(s) not rewritten; "
            "fix the cause and run stepvault rekey again",
            err=True,
        )
        raise typer.Exit(1)


async def _rekey(url: str) -> list[tuple[str, str, str]]:
    store = open_cli_store(url)  # the whole key ring: old keys read
    try:
        if not isinstance(store, Rekeying):
            raise EngineError(f"{type(store).__name__} cannot rekey sessions")
        outcomes = []
        for row in await store.list():
            try:
                outcome = await store.rekey(row.id)
            except SessionNotFoundError:
                continue  # removed since it was listed
            except EngineError as exc:
                outcomes.append((row.id, "failed", str(exc)))
                continue
            detail = "a runner holds it: run rekey again later" if outcome == "busy" else ""
            outcomes.append((row.id, outcome, detail))
        return outcomes
    finally:
        await store.close()


def _print_outcomes(outcomes: list[tuple[str, str, str]]) -> None:
    if not outcomes:
        typer.echo("no sessions", err=True)
        return
    table = Table(title="rekey")
    table.add_column("session", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for session_id, outcome, detail in outcomes:
        table.add_row(
            session_id, Text(outcome, style=_STYLES.get(outcome, "red")), one_line(detail)
        )
    Console().print(table)
    counts = Counter(outcome for _, outcome, _ in outcomes)
    typer.echo(", ".join(f"{count} {outcome}" for outcome, count in sorted(counts.items())))


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro``; on Ctrl-C (or SIGTERM) stop cleanly: every session is whole."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        typer.echo("interrupted: every session is whole; run the command again", err=True)
        raise typer.Exit(130) from None
