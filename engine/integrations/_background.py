"""A private event loop on a daemon thread, for adapters whose callers may be sync or async.

A store may hold resources bound to the loop that first used them (a connection
pool, a lock). An adapter called from sync code, from several event loops, or from
both, runs every store call here instead: one loop, always the same one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..errors import EngineError

_T = TypeVar("_T")


class BackgroundLoop:
    """Run coroutines on one event loop in a daemon thread, started on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._guard = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """Tell whether ``close`` was called."""
        return self._closed

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule ``coro`` on the loop and return a future for its result."""
        loop = self._running_loop(coro)
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the loop and block until it finishes (for sync callers)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(f"{self._name}: a blocking call from its own loop would deadlock")
        return self.submit(coro).result()

    async def run_async(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the loop and await it from the caller's loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def close(self) -> None:
        """Stop the loop and wait for its thread; closing twice is harmless."""
        with self._guard:
            self._closed = True
            loop, stop, thread = self._loop, self._stop, self._thread
            self._loop = self._stop = self._thread = None
        if loop is not None and stop is not None and thread is not None:
            loop.call_soon_threadsafe(stop.set)
            thread.join()

    def _running_loop(self, coro: Coroutine[Any, Any, Any]) -> asyncio.AbstractEventLoop:
        with self._guard:
            if self._closed:
                coro.close()
                raise EngineError(f"{self._name} is closed")
            if self._loop is None:
                ready = threading.Event()
                thread = threading.Thread(
                    target=self._serve, args=(ready,), name=self._name, daemon=True
                )
                thread.start()
                ready.wait()
                self._thread = thread
            assert self._loop is not None
            return self._loop

    def _serve(self, ready: threading.Event) -> None:
        asyncio.run(self._main(ready))

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ready.set()
        await self._stop.wait()
