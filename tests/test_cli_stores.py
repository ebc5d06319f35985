"""``stepvault migrate``: a database store's schema, created or upgraded ahead of time."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

from typer.testing import CliRunner

from engine.cli import app
from engine.stores.postgres import SCHEMA_VERSION as POSTGRES_SCHEMA
from engine.stores.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_migrate_creates_a_sqlite_schema_and_says_its_version(tmp_path: Path) -> None:
    database = tmp_path / "sessions.db"

    code, out, _ = invoke("migrate", "--store", f"sqlite:///{database}")

    assert code == 0
    assert f"schema at version {SQLITE_SCHEMA}" in out
    with closing(sqlite3.connect(database)) as db:
        versions = db.execute("SELECT version FROM stepvault_schema").fetchall()
    assert versions == [(version,) for version in range(1, SQLITE_SCHEMA + 1)]


def test_migrate_of_a_postgres_schema_hides_the_urls_password(postgres_url: str) -> None:
    url = postgres_url.replace("postgresql://postgres@", "postgresql://postgres:unused-secret@")

    code, out, _ = invoke("migrate", "--store", url, "--json")

    assert code == 0
    assert "unused-secret" not in out
    assert json.loads(out)["schema_version"] == POSTGRES_SCHEMA


def test_migrate_of_a_store_without_a_schema_changes_nothing(tmp_path: Path) -> None:
    code, out, _ = invoke("migrate", "--store", str(tmp_path / "sessions"))

    assert code == 0
    assert "nothing to migrate" in out
    assert list(tmp_path.iterdir()) == []


def test_migrate_refuses_a_schema_newer_than_this_stepvault(tmp_path: Path) -> None:
    # Given a database a newer stepvault has migrated
    database = tmp_path / "sessions.db"
    assert invoke("migrate", "--store", f"sqlite:///{database}")[0] == 0
    with closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("INSERT INTO stepvault_schema VALUES (?)", (SQLITE_SCHEMA + 1,))

    # When this version is asked to migrate it
    code, _, err = invoke("migrate", "--store", f"sqlite:///{database}")

    # Then it says so on one line and fails
    assert code == 1
    assert err.startswith("error: ")
    assert "newer than this stepvault" in err
    assert len(err.strip().splitlines()) == 1
