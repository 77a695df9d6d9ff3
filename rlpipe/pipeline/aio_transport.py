"""The explorer's ends of transport.py's channels on zmq.asyncio sockets, for its event loop.

Same wire formats, socket options and frame checks as transport.RequestClient and
transport.ControlClient (the learner, the buffer and the tools keep those): the sockets are
made by transport's own factory and every frame goes through its Codec, so only the waiting
differs. Every wait has a timeout; a timeout or a cancellation never loses a message that
has arrived: anyio does not cancel a task whose awaited future already holds a result, and a
cancelled receive leaves the message in the socket for the next one.

Sockets belong to the event loop that made them; close() them on it.
"""

from __future__ import annotations

import itertools
import time

import anyio
import zmq
import zmq.asyncio

from rlpipe.pipeline import transport
from rlpipe.types import Heartbeat, Message, Ready


def _socket(kind: int, address: str, **options) -> zmq.asyncio.Socket:
    # transport.make_socket keeps every rlpipe socket option in one place; an asyncio
    # context makes it an asyncio socket (the context is a different one from the sync
    # roles' zmq.Context.instance(): one I/O thread of its own).
    return transport.make_socket(zmq.asyncio.Context.instance(), kind, address, False, **options)


class RequestClient:
    """transport.RequestClient (DEALER, request ids, IMMEDIATE) for an event loop: the outbox
    sender and the credit line each own one to the buffer's experience socket."""

    def __init__(self, address: str, *, max_message_bytes: int = transport.CONTROL_MAX_BYTES,
                 max_request_bytes: int = transport.EXPERIENCE_MAX_BYTES):
        self.codec = transport.Codec(max_message_bytes)
        self.max_request_bytes = max_request_bytes
        self.socket = _socket(zmq.DEALER, address, max_message_bytes=max_message_bytes, linger_ms=0, IMMEDIATE=1)
        self._ids = itertools.count(1)

    async def request(self, msg: Message, timeout_s: float) -> Message | None:
        """Send msg and wait for its reply; None if none came within timeout_s (the caller
        sends again). Raises ValueError if msg encodes to more than max_request_bytes."""
        data = self.codec.encode(msg)
        if len(data) > self.max_request_bytes:
            raise ValueError(f"{type(msg).__name__} is {len(data)} bytes, over max_request_bytes={self.max_request_bytes}")
        req_id = next(self._ids).to_bytes(8, "little")
        with anyio.move_on_after(timeout_s):
            await self.socket.send_multipart([req_id, data], copy=False)  # waits while no buffer is connected
            while True:
                frames = await self.socket.recv_multipart(copy=False)
                if len(frames) != 2:
                    self.codec.reject("framing")
                elif frames[0].bytes != req_id:
                    self.codec.reject("stale_reply")  # the answer to an earlier, timed-out request
                elif (reply := self.codec.decode(frames[1])) is not None:
                    return reply
        return None

    def close(self) -> None:
        self.socket.close(linger=0)


class ControlClient:
    """transport.ControlClient (DEALER named by `sender`) for an event loop: Ready when made
    (queued until the learner is there), then heartbeats() in a task of its own, so that a
    long adapter load never silences the explorer, and recv() for the learner's messages."""

    def __init__(self, address: str, sender: str, *, heartbeat_s: float = 2.0,
                 max_message_bytes: int = transport.CONTROL_MAX_BYTES):
        self.sender = sender
        self.heartbeat_s = heartbeat_s
        self.version = -1
        """The adapter version this explorer samples with, reported in heartbeats."""
        self.codec = transport.Codec(max_message_bytes)
        self.socket = _socket(zmq.DEALER, address, max_message_bytes=max_message_bytes, linger_ms=0,
                              SNDHWM=4, ROUTING_ID=sender.encode())
        self._send(Ready(sender=sender))

    def _send(self, msg: Message) -> None:
        try:  # never waits: the queue holds a few, and a heartbeat the learner misses is replaced by the next
            self.socket.send(self.codec.encode(msg), zmq.NOBLOCK).result()
        except zmq.Again:
            pass

    async def heartbeats(self) -> None:
        while True:
            self._send(Heartbeat(sender=self.sender, time=time.time(), version=self.version))
            await anyio.sleep(self.heartbeat_s)

    async def recv(self, timeout_s: float) -> Message | None:
        """The learner's next WeightUpdate or Shutdown, or None after timeout_s."""
        with anyio.move_on_after(timeout_s):
            while True:
                if (msg := transport.decode_control(self.codec, await self.socket.recv_multipart(copy=False))) is not None:
                    return msg
        return None

    def recv_ready(self) -> list[Message]:
        """The messages already waiting (none waited for)."""
        messages = []
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False).result()
            except zmq.Again:
                return messages
            if (msg := transport.decode_control(self.codec, frames)) is not None:
                messages.append(msg)

    def close(self) -> None:
        self.socket.close(linger=0)
