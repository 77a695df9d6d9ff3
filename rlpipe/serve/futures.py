"""Tinker's future protocol, server side.

A submitted call answers `{"request_id": ...}` at once; the client then long-polls
`retrieve_future`. The SDK re-polls immediately on HTTP 408, so a poll is held until the
result exists or `hold_s` (25 s, under the client's 45 s timeout) has passed. Results are kept
for `keep_s` after they finish, for clients that retry a poll.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from dataclasses import dataclass, field

PROTOBUF = "application/x-protobuf"


class UserError(Exception):
    """A request the server understood but refuses (bad input): a future failing with category "user"."""


class NotFound(UserError):
    """An unknown id: HTTP 404."""


@dataclass
class Entry:
    request_id: str
    kind: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    body: bytes | dict | None = None  # bytes: protobuf; dict: JSON
    error: dict | None = None
    finished: float = 0.0


class Futures:
    def __init__(self, hold_s: float = 25.0, keep_s: float = 3600.0):
        self.hold_s = hold_s
        self.keep_s = keep_s
        self._entries: dict[str, Entry] = {}
        self._by_key: dict[tuple, str] = {}
        self._finished: collections.deque[Entry] = collections.deque()

    def new(self, kind: str, key: tuple | None = None) -> tuple[Entry, bool]:
        """(entry, fresh): a retried submission with the same key gets its first entry back."""
        self._forget_old()
        if key is not None and key in self._by_key and self._by_key[key] in self._entries:
            return self._entries[self._by_key[key]], False
        entry = Entry(uuid.uuid4().hex, kind)
        self._entries[entry.request_id] = entry
        if key is not None:
            self._by_key[key] = entry.request_id
        return entry, True

    def finish(self, entry: Entry, body: bytes | dict | None = None, error: dict | None = None) -> None:
        entry.body, entry.error, entry.finished = body, error, time.monotonic()
        entry.done.set()
        self._finished.append(entry)

    def completed(self, kind: str, body: dict) -> Entry:
        entry, _ = self.new(kind)
        self.finish(entry, body)
        return entry

    def get(self, request_id: str) -> Entry | None:
        return self._entries.get(request_id)

    async def wait(self, entry: Entry) -> bool:
        try:
            await asyncio.wait_for(entry.done.wait(), self.hold_s)
            return True
        except TimeoutError:
            return False

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - self.keep_s
        while self._finished and self._finished[0].finished < cutoff:
            entry = self._finished.popleft()
            self._entries.pop(entry.request_id, None)
        if len(self._by_key) > 2 * len(self._entries) + 1024:
            self._by_key = {k: v for k, v in self._by_key.items() if v in self._entries}
