"""The start/stop/run skeleton of the explorer's long-running loops (the outbox sender, the
credit line), written once.

In the explorer each loop is a task of its one task group (`tg.start_soon(x.run)`): its
first error ends the group, and with it the explorer; the group's cancellation stops it.
Synchronous code without an event loop (tools, tests) calls start() instead: the loop then
runs on the thread of an anyio blocking portal until stop(), and `error` says why it ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable

import anyio
import anyio.from_thread

log = logging.getLogger(__name__)


class Supervised:
    """Runs body() once, until it returns, fails or is cancelled. The body waits between
    rounds with nap(), which wake() cuts short."""

    def __init__(self, body: Callable[[], Awaitable[None]], name: str):
        self.body = body
        self.name = name
        self.error: BaseException | None = None
        """What ended the body, if it failed."""
        self._running = False
        self._woken: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._portal = None  # (its context manager, the portal, the loop) while started by start()
        self._future: concurrent.futures.Future | None = None

    async def run(self) -> None:
        self._woken, self._running = anyio.Event(), True
        try:
            with anyio.CancelScope() as self._scope:
                await self.body()
        except Exception as err:
            self.error = err
            raise
        finally:
            self._running = False

    @property
    def alive(self) -> bool:
        """Running, or started by start() and not ended yet."""
        return self._running or (self._future is not None and not self._future.done())

    async def nap(self, timeout_s: float) -> None:
        """Wait up to timeout_s; at once if woken since the last nap."""
        with anyio.move_on_after(timeout_s):
            await self._woken.wait()
        self._woken = anyio.Event()

    def wake(self) -> None:
        """From the loop the body runs on; from any thread once started with start()."""
        if self._portal is not None:
            self._portal[2].call_soon_threadsafe(self._set_woken)
        else:
            self._set_woken()

    def _set_woken(self) -> None:
        if self._woken is not None:
            self._woken.set()

    def start(self) -> None:
        """Run on a thread of its own, for callers without an event loop."""
        manager = anyio.from_thread.start_blocking_portal(name=self.name)
        portal = manager.__enter__()
        self._portal = (manager, portal, portal.call(asyncio.get_running_loop))
        self._future = portal.start_task_soon(self.run, name=self.name)

    def stop(self, timeout_s: float) -> None:
        """End what start() started: cancel the body, wait up to timeout_s for it, stop the thread."""
        if self._portal is None:
            return
        manager, portal, _ = self._portal
        portal.call(self._cancel)
        concurrent.futures.wait([self._future], timeout_s)
        portal.call(portal.stop, True)
        self._portal = None
        manager.__exit__(None, None, None)

    def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        elif self._future is not None:
            self._future.cancel()  # not started yet


def first_error(errors: BaseExceptionGroup) -> BaseException:
    """The error a task group ended with (the first one collected, nested groups opened in
    order); any others are logged, not lost."""
    def leaves(group):
        for error in group.exceptions:
            yield from leaves(error) if isinstance(error, BaseExceptionGroup) else (error,)

    every = list(leaves(errors))
    real = [e for e in every if not isinstance(e, anyio.get_cancelled_exc_class())] or every
    for error in real[1:]:
        log.error("also failed: %s: %s", type(error).__name__, error)
    return real[0]
