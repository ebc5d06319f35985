"""``stepvault migrate``: create or upgrade a database store's schema ahead of time.

The SQLite and PostgreSQL stores migrate their schema themselves on first use;
running ``migrate`` once before starting runners (say, in a deploy step) keeps that
out of their start-up and reports a schema newer than this stepvault at once.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

import typer

from .cli_support import DEFAULT_STORE, JsonOption, StoreOption, dump_json, open_cli_store
from .stores import Store


@runtime_checkable
class MigratingStore(Store, Protocol):
    """A store with a schema of its own, which it creates and upgrades."""

    async def migrate(self) -> int:
        """Create or upgrade the schema; return its version."""
        ...


def register(app: typer.Typer) -> None:
    """Add ``migrate`` to the ``stepvault`` command."""
    app.command()(migrate)


def migrate(store: StoreOption = DEFAULT_STORE, json_output: JsonOption = False) -> None:
    """Create or upgrade a database store's schema (sqlite:///..., postgresql://...)."""
    opened = open_cli_store(store)
    version = None
    if isinstance(opened, MigratingStore):
        version = asyncio.run(_migrate(opened))
        shown = repr(opened)  # names the database without the URL's password
        message = f"{shown}: schema at version {version}"
    else:
        shown = store
        message = f"{store}: this store keeps no schema, nothing to migrate"
    if json_output:
        typer.echo(dump_json({"store": shown, "schema_version": version}))
    else:
        typer.echo(message)


async def _migrate(store: MigratingStore) -> int:
    try:
        return await store.migrate()
    finally:
        await store.close()
