"""The learner's control channel (transport.ControlServer) on a thread of its own.

The thread answers the explorers' Ready and heartbeats while the learner trains, and sends
each adapter version as soon as its bytes are there: the learner asks its client for them
after a step (publish), the model thread takes them before it starts the next step's work,
and the encoding and the send happen here, while the next step trains. Nothing of it is on
the step's path. Commands run in the order given, so a Shutdown asked for after the last
publish goes out after it.

An error here (an adapter over the control channel's frame limit, a client that failed to
take the bytes) stops the thread; the learner's main thread raises it at its next check().
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from rlpipe.pipeline.transport import ControlServer
from rlpipe.types import WeightUpdate

log = logging.getLogger(__name__)

POLL_S = 0.05


@dataclass
class _Publish:
    update: WeightUpdate  # version, step, identity: what the learner knows when it asks
    fields: Any  # a future (done(), result()) of the fields the client fills in
    asked_at: float
    deadline: float


@dataclass
class _Shutdown:
    reason: str
    run_id: str


class ControlThread:
    def __init__(self, address: str, *, publish_timeout_s: float = 3600.0, **server_options):
        """Binds address now (an address in use fails the learner here, not on the thread).
        publish_timeout_s bounds how long a publish waits for the client's bytes."""
        self.server = ControlServer(address, **server_options)
        self.publish_timeout_s = publish_timeout_s
        self.error: BaseException | None = None
        self.publish_s: float | None = None
        """Seconds from the newest publish() to its update queued to the explorers."""
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: collections.deque = collections.deque()
        self._given = self._done = 0  # commands given (the learner's thread), done (this one)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rlpipe-control", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the learner's side

    def publish(self, update: WeightUpdate, fields) -> None:
        """Send update, completed with the fields `fields` (a future) holds, once it holds them."""
        now = time.monotonic()
        self._given += 1
        self._commands.put(_Publish(update, fields, now, now + self.publish_timeout_s))

    def shutdown(self, reason: str, run_id: str) -> None:
        """Tell every explorer to stop (after the publishes asked for before), and any that
        registers later too."""
        self._given += 1
        self._commands.put(_Shutdown(reason, run_id))

    def check(self) -> None:
        """Raise the thread's error, if it stopped on one."""
        if self.error is not None:
            raise self.error

    def wait(self, future: concurrent.futures.Future) -> Any:
        """future's result (a future bounded by a timeout of its own, as a batch fetch is);
        meanwhile check() every POLL_S, so an error here is not held up behind the wait."""
        while not future.done():
            self.check()
            concurrent.futures.wait([future], timeout=POLL_S)
        return future.result()

    def drain(self, timeout_s: float) -> None:
        """Wait until every command given so far is done: its error, or TimeoutError after timeout_s."""
        given, deadline = self._given, time.monotonic() + timeout_s
        while self._done < given and time.monotonic() < deadline:
            self.check()
            time.sleep(POLL_S)
        self.check()
        if self._done < given:
            raise TimeoutError(f"the learner's control thread did not send what it was given within {timeout_s:.0f} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)
        self.server.close()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        self._pending.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                while self._pending and self._do(self._pending[0]):
                    self._pending.popleft()
                    self._done += 1
                self.server.poll(POLL_S)
        except BaseException as err:  # noqa: BLE001  (raised again by the learner's check())
            log.error("the learner's control thread failed: %s: %s", type(err).__name__, err)
            self.error = err

    def _do(self, command) -> bool:
        """Do command if it can be done now; whether it was."""
        match command:
            case _Shutdown(reason=reason, run_id=run_id):
                self.server.shutdown(reason, run_id=run_id)
            case _Publish(update=update, fields=fields, asked_at=asked_at, deadline=deadline):
                if not fields.done():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the adapter of version {update.version} was not taken within "
                                           f"{self.publish_timeout_s:.0f} s")
                    return False
                update = msgspec.structs.replace(update, **fields.result(0))
                self.server.publish(update)  # checks the size against the control channel's limit
                self.publish_s = time.monotonic() - asked_at
                log.info("published version %d%s", update.version,
                         f": {update.sampler_path}" if update.sampler_path else f" ({len(update.adapter_weights)} bytes)")
        return True
