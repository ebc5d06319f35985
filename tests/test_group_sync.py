"""Group commit's sync thread: many waiters share few syncs, and a failed sync fails them all."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from engine.errors import StorageError
from engine.stores import group_sync
from engine.stores.group_sync import GroupSync

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="group commit is built on Linux's syncfs"
)


async def test_concurrent_waiters_share_syncs(tmp_path: Path) -> None:
    # Given a thousand writers that each wrote a file and want it durable
    group = GroupSync(tmp_path)
    try:

        async def write_and_wait(index: int) -> None:
            (tmp_path / f"f{index}").write_bytes(b"x" * 600)
            await group.wait()

        # When they all wait at once
        await asyncio.gather(*(write_and_wait(i) for i in range(1000)))

        # Then every wait returned, and far fewer syncs than writers ran
        assert 1 <= group.syncs < 1000
    finally:
        group.close()


async def test_a_lone_waiter_gets_its_own_sync(tmp_path: Path) -> None:
    group = GroupSync(tmp_path)
    try:
        for expected in (1, 2, 3):
            await group.wait()
            assert group.syncs == expected  # never served by a sync that began before it
    finally:
        group.close()


async def test_a_failed_sync_fails_every_waiter_of_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a filesystem whose write-back fails (the kernel's EIO, as syncfs reports it)
    def failing(fd: int) -> None:
        raise OSError(5, os.strerror(5))

    monkeypatch.setattr(group_sync, "syncfs", failing)
    group = GroupSync(tmp_path)
    try:
        # When writers wait, Then each is told, naming the store's folder
        outcomes = await asyncio.gather(*(group.wait() for _ in range(50)), return_exceptions=True)
        assert all(isinstance(o, StorageError) for o in outcomes)
        assert str(tmp_path) in str(outcomes[0])
        assert group.syncs == 0
    finally:
        group.close()


async def test_after_a_failed_sync_no_wait_ever_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given one sync that fails (Linux then marks the lost pages clean: a later
    # sync would succeed without writing them)
    calls = 0

    def fails_once(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(5, os.strerror(5))

    monkeypatch.setattr(group_sync, "syncfs", fails_once)
    group = GroupSync(tmp_path)
    try:
        with pytest.raises(StorageError, match="group sync failed"):
            await group.wait()

        # When more writers wait, on the same store, even after a close
        group.close()
        for _ in range(3):
            # Then each is refused, and nothing is synced as if all were well
            with pytest.raises(StorageError, match="open the store again"):
                await group.wait()
        assert calls == 1
    finally:
        group.close()


async def test_a_cancelled_waiter_does_not_break_the_others(tmp_path: Path) -> None:
    group = GroupSync(tmp_path)
    try:
        cancelled = asyncio.ensure_future(group.wait())
        others = [asyncio.ensure_future(group.wait()) for _ in range(10)]
        cancelled.cancel()
        await asyncio.gather(*others)
        assert cancelled.cancelled()
        await group.wait()  # the thread still serves new waiters
    finally:
        group.close()


async def test_a_wait_after_close_starts_the_thread_again(tmp_path: Path) -> None:
    group = GroupSync(tmp_path)
    await group.wait()
    group.close()
    await group.wait()  # a store may be used again after close()
    assert group.syncs == 2
    group.close()
