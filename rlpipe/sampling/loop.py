"""The background event loop a vLLM engine lives on, and small helpers for work on it.

AsyncLLM is bound to the event loop it runs on, so each engine owns a daemon thread running
its own loop; callers in any thread submit coroutines to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading

log = logging.getLogger(__name__)


class LoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro):
        """Schedule coro on the loop (from any thread); returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def log_failure(what: str):
    """A done-callback for work nobody awaits (adapter removals, aborted requests): its
    error is logged, never left in the future unseen."""

    def callback(future) -> None:
        if not future.cancelled() and future.exception() is not None:
            error = future.exception()
            log.error("%s failed: %s: %s", what, type(error).__name__, error)

    return callback


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """Set environment variables for what starts inside (a child process inherits them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
