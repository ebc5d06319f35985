"""``stepvault verify`` and ``stepvault rekey``: verdicts, exit codes, quarantine, rotation.

In-process through typer's CliRunner on real files; one real process checks the
exit code and the one-line error a shell sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from engine import Checkpoint, FileStore, Session, codec
from engine.cli import app
from engine.crypto import generate_key
from engine.models import utcnow

MakeSession = Callable[..., Session]
ROOT = Path(__file__).resolve().parents[1]


def invoke(root: Path, *args: str, key: str | None = None, old: str | None = None) -> Result:
    env = {
        "STEPVAULT_STORE": str(root),
        "SESSION_ENCRYPTION_KEY": key,
        "SESSION_ENCRYPTION_OLD_KEYS": old,
    }
    return CliRunner().invoke(app, list(args), env=env)


def verdicts(result: Result) -> dict[str, dict[str, Any]]:
    return {row["session_id"]: row for row in json.loads(result.stdout)}


def store_with(root: Path, make_session: MakeSession, steps: int, key: str | None = None) -> str:
    """Create a session with ``steps`` checkpoints in a real file store; return its id."""

    async def build() -> str:
        store = FileStore(root, encryption_key=key)
        session = make_session()
        await store.create(session)
        lease = await store.acquire(session.id, "test")
        assert lease is not None
        for index in range(steps):
            now = utcnow()
            await store.commit(
                lease,
                Checkpoint(
                    revision=index + 1,
                    status="running",
                    last_activity=now,
                    expires_at=now + timedelta(hours=1),
                    step=f"step-{index}",
                    output={"index": index},
                ),
            )
        await store.close()
        return session.id

    return asyncio.run(build())


def journal(root: Path, session_id: str) -> Path:
    return root / session_id / "journal"


def flip_first_record(root: Path, session_id: str) -> None:
    """Damage the body of the journal's first record (not its last: that reads as torn)."""
    path = journal(root, session_id)
    data = bytearray(path.read_bytes())
    data[codec.HEADER_SIZE + 2] ^= 0xFF
    path.write_bytes(bytes(data))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- verify --------------------------------------------------------------------------


def test_verify_of_a_healthy_store_says_ok_and_exits_0(
    tmp_path: Path, make_session: MakeSession
) -> None:
    key = generate_key()
    ids = {store_with(tmp_path, make_session, n, key) for n in (0, 2)}

    result = invoke(tmp_path, "verify", key=key)

    assert result.exit_code == 0, result.output
    assert "2 ok" in result.stdout
    assert all(session_id in result.stdout for session_id in ids)
    as_json = invoke(tmp_path, "verify", "--json", key=key)
    assert as_json.exit_code == 0
    assert {row["verdict"] for row in verdicts(as_json).values()} == {"ok"}
    assert {row["detail"] for row in verdicts(as_json).values()} == {"encrypted"}


def test_verify_tells_torn_corrupt_and_undecryptable_apart(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given one healthy session, one with a torn tail, one corrupt, one under another key
    key, other = generate_key(), generate_key()
    healthy = store_with(tmp_path, make_session, 1, key)
    torn = store_with(tmp_path, make_session, 1, key)
    with journal(tmp_path, torn).open("ab") as handle:
        handle.write(b"SV\x01")  # an append cut short by a crash
    corrupt = store_with(tmp_path, make_session, 2, key)
    flip_first_record(tmp_path, corrupt)
    foreign = store_with(tmp_path, make_session, 1, other)
    before = tree(tmp_path)

    # When verify runs
    result = invoke(tmp_path, "verify", "--json", key=key)

    # Then each gets its verdict, the exit code says something is wrong, nothing moved
    found = verdicts(result)
    assert {sid: row["verdict"] for sid, row in found.items()} == {
        healthy: "ok",
        torn: "torn tail",
        corrupt: "corrupt",
        foreign: "undecryptable",
    }
    assert "offset" in found[corrupt]["detail"]
    assert "master key" in found[foreign]["detail"]
    assert result.exit_code == 1
    assert "2 of 4 session(s) failed: 1 corrupt, 1 undecryptable" in result.stderr
    assert tree(tmp_path) == before


def test_a_torn_tail_alone_is_reported_but_is_not_a_failure(
    tmp_path: Path, make_session: MakeSession
) -> None:
    torn = store_with(tmp_path, make_session, 1)
    with journal(tmp_path, torn).open("ab") as handle:
        handle.write(b"SV\x01")  # an append cut short by a crash

    result = invoke(tmp_path, "verify")

    assert result.exit_code == 0, result.output
    assert "torn tail" in result.stdout
    assert "1 torn tail" in result.stdout


def test_zeros_after_the_last_record_are_reserved_space_not_damage(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a journal ending in zeros, as a runner killed while it held the session
    # leaves the space it reserved for its next checkpoints
    session_id = store_with(tmp_path, make_session, 2)
    with journal(tmp_path, session_id).open("ab") as handle:
        handle.write(bytes(4096))

    result = invoke(tmp_path, "verify", "--json")

    assert result.exit_code == 0, result.output
    assert verdicts(result)[session_id]["verdict"] == "ok"


def test_quarantine_moves_only_corrupt_sessions_aside_whole(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a corrupt session and one whose key is not given
    key = generate_key()
    corrupt = store_with(tmp_path, make_session, 2, key)
    flip_first_record(tmp_path, corrupt)
    undecryptable = store_with(tmp_path, make_session, 1, generate_key())
    corrupt_files = tree(tmp_path / corrupt)
    undecryptable_files = tree(tmp_path / undecryptable)

    # When verify runs with --quarantine
    result = invoke(tmp_path, "verify", "--quarantine", "--json", key=key)

    # Then the corrupt one is moved, whole, into .quarantine; the other stays put
    assert result.exit_code == 1
    moved = Path(verdicts(result)[corrupt]["quarantined_to"])
    assert moved.parent == tmp_path / ".quarantine"
    assert moved.name.startswith(corrupt)
    assert tree(moved) == corrupt_files
    assert not (tmp_path / corrupt).exists()
    assert "quarantined_to" not in verdicts(result)[undecryptable]
    assert tree(tmp_path / undecryptable) == undecryptable_files
    # and the next verify no longer lists the quarantined session
    again = verdicts(invoke(tmp_path, "verify", "--json", key=key))
    assert list(again) == [undecryptable]


def test_verify_of_an_empty_or_memory_store_says_so(tmp_path: Path) -> None:
    assert invoke(tmp_path, "verify").exit_code == 0
    result = invoke(tmp_path, "verify", "--store", "memory://", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []


def test_verify_in_a_real_process_exits_1_with_one_error_line(
    tmp_path: Path, make_session: MakeSession
) -> None:
    corrupt = store_with(tmp_path, make_session, 2)
    flip_first_record(tmp_path, corrupt)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SESSION_", "STEPVAULT_"))}

    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "verify", "--store", str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 1
    assert "corrupt" in done.stdout
    assert done.stderr.strip() == "error: 1 of 1 session(s) failed: 1 corrupt"


# -- rekey ------------------------------------------------------------------------------


def test_rekey_needs_the_new_key(tmp_path: Path) -> None:
    result = invoke(tmp_path, "rekey")

    assert result.exit_code == 1
    assert "SESSION_ENCRYPTION_KEY" in result.stderr


def test_rekey_moves_every_session_to_the_new_key_and_a_rerun_does_nothing(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given sessions under an old key and one in clear
    old, new = generate_key(), generate_key()
    ids = {store_with(tmp_path, make_session, n, old) for n in (0, 1, 3)}
    ids.add(store_with(tmp_path, make_session, 1))

    # When rekey runs with the new key and the old one
    result = invoke(tmp_path, "rekey", "--json", key=new, old=old)

    # Then every session is rewritten and verifies under the new key alone
    assert result.exit_code == 0, result.output
    assert {row["outcome"] for row in json.loads(result.stdout)} == {"rekeyed"}
    checked = verdicts(invoke(tmp_path, "verify", "--json", key=new))
    assert set(checked) == ids
    assert {row["detail"] for row in checked.values()} == {"encrypted"}
    again = invoke(tmp_path, "rekey", "--json", key=new, old=old)
    assert {row["outcome"] for row in json.loads(again.stdout)} == {"current"}


def test_rekey_reports_busy_and_unreadable_sessions_and_changes_them_not(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a session a runner holds, and one under a key nobody gave
    old, new = generate_key(), generate_key()
    held = store_with(tmp_path, make_session, 1, old)
    lost = store_with(tmp_path, make_session, 1, generate_key())
    before = tree(tmp_path)

    async def hold_and_rekey() -> Result:
        holder = FileStore(tmp_path, encryption_key=old)
        lease = await holder.acquire(held, "runner")
        assert lease is not None
        try:
            return await asyncio.to_thread(invoke, tmp_path, "rekey", "--json", key=new, old=old)
        finally:
            await holder.close()

    # When rekey runs
    result = asyncio.run(hold_and_rekey())

    # Then it says which it could not rewrite and why, exits 1, and rewrote neither
    outcomes = {row["session_id"]: row for row in json.loads(result.stdout)}
    assert outcomes[held]["outcome"] == "busy"
    assert outcomes[lost]["outcome"] == "failed"
    assert "master key" in outcomes[lost]["detail"]
    assert result.exit_code == 1
    assert "run stepvault rekey again" in result.stderr
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.endswith("/lock")} == {
        k: v for k, v in before.items() if not k.endswith("/lock")
    }


@pytest.mark.parametrize("command", ["verify", "rekey"])
def test_old_keys_without_an_active_key_are_refused(tmp_path: Path, command: str) -> None:
    result = invoke(tmp_path, command, old=generate_key())

    assert result.exit_code == 1
    assert "SESSION_ENCRYPTION_KEY" in result.stderr
