"""APIFuture: what every Tinker-style call returns.

Calls are queued on the client's single worker thread as soon as they are made, so a caller
can submit forward_backward and optim_step back to back and wait once, exactly as with
Tinker. Waiting always has a deadline: a wedged worker surfaces as an error, not a hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Generic, TypeVar

T = TypeVar("T")


class CallTimeout(TimeoutError):
    pass


class APIFuture(Generic[T]):
    def __init__(self, future: concurrent.futures.Future, what: str, timeout_s: float):
        self._future = future
        self._what = what
        self._timeout_s = timeout_s

    def result(self, timeout: float | None = None) -> T:
        limit = self._timeout_s if timeout is None else timeout
        try:
            return self._future.result(limit)
        except concurrent.futures.TimeoutError:
            if self._future.done():
                raise  # a TimeoutError raised by the call itself, not our deadline
            raise CallTimeout(f"{self._what} did not finish within {limit:.0f} s") from None

    async def result_async(self, timeout: float | None = None) -> T:
        limit = self._timeout_s if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._future)), limit)
        except asyncio.TimeoutError:
            if self._future.done():
                raise
            raise CallTimeout(f"{self._what} did not finish within {limit:.0f} s") from None

    def done(self) -> bool:
        return self._future.done()

    def __await__(self):
        return self.result_async().__await__()
