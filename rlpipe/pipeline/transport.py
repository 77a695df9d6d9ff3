"""Typed ZeroMQ messaging between the rlpipe roles (stable roles bind, dynamic ones connect).

(About 500 lines, over the 400 a module keeps to: both ends of all three channels, so that
each wire format is written and read in one place.)

  explorers DEALER -> buffer ROUTER   experience: TrajectoryGroup -> GroupAck. At least once:
                                      a group stays in the explorer's on-disk outbox and is sent
                                      again until acknowledged; the buffer deduplicates by
                                      group_id (a re-send is answered "duplicate") and acks only
                                      once its decision is on disk. A buffer that is away or slow
                                      back-pressures explorers: they stop starting groups once
                                      explorer.max_unacked are unacknowledged.
  learner DEALER -> buffer ROUTER     BatchRequest -> Batch.
                                      In both request/reply flows a request-id frame pairs replies
                                      with requests, so a late reply to a timed-out request is
                                      never taken for the answer to the current one.
  explorers DEALER -> learner ROUTER  control. Explorers send Ready on connect (against slow
                                      joiners) and Heartbeats; the learner sends the latest
                                      WeightUpdate to every registered peer: two frames, the
                                      update without its adapter weights, then the weights as
                                      they are (sent without a copy; at most CONTROL_MAX_BYTES
                                      in all, checked before sending).

Binding: a role binds the address its config gives it (the buffer experience and batches,
the learner control) and connects to the others. Binding beyond loopback (a LAN address, a
wildcard "*" / "0.0.0.0", an interface name other than "lo") opens the role to other hosts, so
a role started from a config refuses it unless addresses.bind_public is set (checked before
the role starts, pipeline/addresses.py, with `is_loopback` below); an address that is not one
of this host's is an error restarting cannot fix (AddressNotHere).

Each wrapper owns one msgspec Encoder and one typed Decoder of `Message` (dispatched on the
"type" tag). A frame that is not msgpack, fails the schema, has an unknown tag, is framed
wrongly or exceeds `max_message_bytes` is counted in `rejected[reason]` and skipped; the
receiver goes on. Every blocking call takes a timeout.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket as pysocket
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq

from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.types import Heartbeat, Message, Ready, Shutdown, WeightUpdate

log = logging.getLogger(__name__)

# Default frame size limits: experience (a group of long trajectories), frames that carry
# adapters or whole batches, and sockets that only receive small requests and heartbeats.
EXPERIENCE_MAX_BYTES, CONTROL_MAX_BYTES, SMALL_MAX_BYTES = 64 << 20, 1 << 30, 1 << 20
LINGER_MS = 1000  # close() may spend this long flushing unsent messages, never forever

_KNOWN_TAGS = frozenset(t.__struct_config__.tag for t in typing.get_args(Message))


class _TagOnly(msgspec.Struct):
    type: str | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago; binding "tcp://host:*" avoids the race."""
    with pysocket.socket(pysocket.AF_INET, pysocket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp_address(port: int | None = None, host: str = "127.0.0.1") -> str:
    return f"tcp://{host}:{free_port(host) if port is None else port}"


WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", "[::]"})
"""Bind hosts that mean every interface of the binding host; not a place to connect to."""


def tcp_host(address: str) -> str | None:
    """The host of a "tcp://HOST:PORT" address ("[::1]" keeps its brackets); None for ipc://,
    inproc:// and anything else that is no network address."""
    if not address.startswith("tcp://"):
        return None
    host, sep, _ = address.removeprefix("tcp://").rpartition(":")
    return host if sep else None


def is_loopback(address: str) -> bool:
    """Whether binding address is reachable from this host only: a loopback IP (127.0.0.0/8,
    ::1), "localhost", the "lo" interface, or no network address at all (ipc://, inproc://).
    A LAN IP, a wildcard, another interface name or a hostname is not."""
    import ipaddress

    host = tcp_host(address)
    if host is None:
        return not address.startswith(("tcp://", "udp://", "pgm://", "epgm://", "ws://", "wss://"))
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False  # an interface name or a hostname: assume it reaches beyond this host


class Codec:
    """One Encoder, one typed Decoder and the rejection counters of one socket."""

    def __init__(self, max_message_bytes: int, on_reject: Callable[[str], None] | None = None):
        self.max_message_bytes = max_message_bytes
        self.rejected: dict[str, int] = {}
        self._on_reject = on_reject
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Message)

    def encode(self, msg: Message) -> bytes:
        return self._encoder.encode(msg)

    def decode(self, frame: zmq.Frame | bytes) -> Message | None:
        buf = frame.buffer if isinstance(frame, zmq.Frame) else frame
        if len(buf) > self.max_message_bytes:
            return self.reject("oversize")
        try:
            return self._decoder.decode(buf)
        except msgspec.ValidationError:
            return self.reject("unknown_tag" if _unknown_tag(buf) else "schema")
        except msgspec.DecodeError:
            return self.reject("not_msgpack")

    def reject(self, reason: str) -> None:
        n = self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th... so a flood cannot flood the log
            log.warning("rejected frame (%s), %d so far", reason, n)
        if self._on_reject is not None:
            self._on_reject(reason)


def _unknown_tag(buf) -> bool:
    """Tell "a message type we do not know" from "a known type with bad fields"."""
    try:
        tag = msgspec.msgpack.decode(buf, type=_TagOnly).type
    except msgspec.DecodeError:
        return False
    return tag is not None and tag not in _KNOWN_TAGS


def decode_control(codec: Codec, frames: list[zmq.Frame]) -> Message | None:
    """A control message: one frame, or a WeightUpdate whose adapter weights follow as a frame of
    their own (ControlServer.publish sends the learner's bytes without a copy)."""
    if len(frames) == 1:
        return codec.decode(frames[0])
    if len(frames) != 2:
        return codec.reject("framing")
    if len(frames[0].buffer) + len(frames[1].buffer) > codec.max_message_bytes:
        return codec.reject("oversize")
    match codec.decode(frames[0]):
        case WeightUpdate(adapter_weights=b"") as update:
            return msgspec.structs.replace(update, adapter_weights=frames[1].bytes)
        case None:
            return None
        case _:
            return codec.reject("framing")


def make_socket(ctx: zmq.Context | None, kind: int, address: str, bind: bool, *,
                 max_message_bytes: int, hard_max_bytes: int | None = None,
                 linger_ms: int = LINGER_MS, **options: int | bytes) -> zmq.Socket:
    """A socket with the options every rlpipe socket needs, plus `options` (ZMQ names)."""
    sock = (ctx or zmq.Context.instance()).socket(kind)
    # ZMQ_MAXMSGSIZE is the memory guard: libzmq drops the connection of a peer that announces
    # a bigger frame before allocating it (frames in flight on that connection are lost and
    # cannot be counted here). The soft limit below it is checked by the Codec and counted,
    # and RequestClient refuses oversize requests itself, so they never reach the guard.
    options = {"MAXMSGSIZE": hard_max_bytes or 2 * max_message_bytes, "LINGER": linger_ms, **options}
    if not bind:  # notice a dead peer (killed host, cut network) without waiting for TCP timeouts
        options |= {"HEARTBEAT_IVL": 1000, "HEARTBEAT_TIMEOUT": 5000}
    for opt, value in options.items():
        sock.setsockopt(getattr(zmq, opt), value)
    if not bind:
        sock.connect(address)
        return sock
    try:
        sock.bind(address)
    except zmq.ZMQError as err:
        sock.close(linger=0)
        if err.errno == zmq.EADDRINUSE:  # restarting cannot free it: say whose and what to do
            raise AddressInUse(f"cannot bind {address}: the address is already in use (another run on this host?); "
                               "leave [addresses] unset so `rlpipe run` picks free ports, or choose others") from None
        if err.errno in (errno.EADDRNOTAVAIL, errno.ENODEV):  # another host's address, or no such interface (a hostname)
            raise AddressNotHere(f"cannot bind {address}: no interface of this host has that address; a role binds "
                                 "its own host's address (buffer: experience, batches; learner: control) and "
                                 "connects to the others'") from None
        raise
    return sock


class AddressInUse(Unrecoverable):
    pass


class AddressNotHere(Unrecoverable):
    pass


class UpdateTooLarge(Unrecoverable):
    pass


def _wait(sock: zmq.Socket, event: int, deadline: float) -> bool:
    remaining_ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
    return bool(sock.poll(remaining_ms, event))


def _send(sock: zmq.Socket, frames: list[bytes], deadline: float) -> bool:
    """Queue a multipart message, waiting for room until the deadline."""
    while True:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            if not _wait(sock, zmq.POLLOUT, deadline):
                return False


def _recv(sock: zmq.Socket, deadline: float) -> list[zmq.Frame] | None:
    while True:
        try:
            return sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if not _wait(sock, zmq.POLLIN, deadline):
                return None


class _Closing:
    socket: zmq.Socket

    @property
    def address(self) -> str:
        """The endpoint actually bound or connected (resolves "tcp://127.0.0.1:*")."""
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self, linger_ms: int | None = None) -> None:
        self.socket.close(linger=linger_ms)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- requests: DEALER/ROUTER


class RequestClient(_Closing):
    """DEALER side of request/reply: an explorer sends TrajectoryGroups to the buffer (each
    answered by a GroupAck), the learner asks it for batches.

    Unlike REQ, a DEALER has no send/recv lockstep that a lost reply can wedge, so a peer
    that restarts costs one timed-out request, which the caller simply repeats.

    max_message_bytes bounds the replies taken, max_request_bytes the requests sent: it
    should match the server's max_message_bytes, which would only count and discard more.

    IMMEDIATE has a price: a reply that arrives just before the server closes its socket can
    be lost, as libzmq drops a broken connection's pipe with the messages not yet read in it
    (measured: 1.5-6.5% of replies sent right before close(), none without IMMEDIATE). The
    request times out and is sent again; the callers retry and the buffer deduplicates groups
    by id and serves batches idempotently, so it costs a re-send, not a message."""

    def __init__(self, address: str, *, max_message_bytes: int = CONTROL_MAX_BYTES,
                 max_request_bytes: int = EXPERIENCE_MAX_BYTES, linger_ms: int = 0,
                 ctx: zmq.Context | None = None):
        self.codec = Codec(max_message_bytes)
        self.max_request_bytes = max_request_bytes
        # IMMEDIATE: queue only on a live connection, so requests do not pile up while the
        # server is down and get answered in a burst later.
        self.socket = make_socket(ctx, zmq.DEALER, address, False, max_message_bytes=max_message_bytes,
                                   linger_ms=linger_ms, IMMEDIATE=1)
        self._ids = itertools.count(1)

    def request(self, msg: Message, timeout_s: float) -> Message | None:
        """Send msg and wait for its reply; None if the server did not answer in time.
        Raises ValueError if msg encodes to more than max_request_bytes."""
        deadline = time.monotonic() + timeout_s
        data = self.codec.encode(msg)
        if len(data) > self.max_request_bytes:
            # Refuse at the source: the server would only count and discard it, and the caller
            # would wait out every timeout and send it again, forever.
            raise ValueError(f"{type(msg).__name__} is {len(data)} bytes, over "
                             f"max_request_bytes={self.max_request_bytes}")
        req_id = next(self._ids).to_bytes(8, "little")
        if not _send(self.socket, [req_id, data], deadline):
            return None
        while (frames := _recv(self.socket, deadline)) is not None:
            if len(frames) != 2:
                self.codec.reject("framing")
            elif frames[0].bytes != req_id:
                self.codec.reject("stale_reply")  # answer to an earlier, timed-out request
            elif (reply := self.codec.decode(frames[1])) is not None:
                return reply
        return None


ReplyTo = tuple[bytes, bytes]  # (peer identity, request id): where RequestServer.reply sends


class RequestServer(_Closing):
    """ROUTER side of request/reply (the buffer binds and answers)."""

    def __init__(self, address: str, *, bind: bool = True, max_message_bytes: int = SMALL_MAX_BYTES,
                 on_reject: Callable[[str], None] | None = None, ctx: zmq.Context | None = None):
        self.codec = Codec(max_message_bytes, on_reject)
        # MANDATORY: a reply to a vanished peer raises instead of disappearing silently.
        self.socket = make_socket(ctx, zmq.ROUTER, address, bind, max_message_bytes=max_message_bytes,
                                   ROUTER_MANDATORY=1)

    def recv(self, timeout_s: float) -> tuple[ReplyTo, Message] | None:
        deadline = time.monotonic() + timeout_s
        while (frames := _recv(self.socket, deadline)) is not None:
            if len(frames) != 3:
                self.codec.reject("framing")
            elif (msg := self.codec.decode(frames[2])) is not None:
                return (frames[0].bytes, frames[1].bytes), msg
        return None

    def reply(self, to: ReplyTo, msg: Message) -> bool:
        """Never blocks. False if the requester is gone or not reading: it times out and asks
        again, and serving is idempotent, so nothing is lost."""
        try:
            self.socket.send_multipart([*to, self.codec.encode(msg)], zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as e:  # EAGAIN: its queue is full; EHOSTUNREACH: it is gone
            if e.errno not in (zmq.EAGAIN, zmq.EHOSTUNREACH):
                raise
            return False


# --------------------------------------------------------------------------- control: weight updates


@dataclass
class Peer:
    name: str
    last_seen: float
    version: int = -1  # adapter version the explorer last reported in a heartbeat
    sent_version: int = -1  # newest WeightUpdate queued to it; below latest = a send is owed


class ControlServer(_Closing):
    """Learner side of the control channel: ROUTER, bound.

    Keeps the latest WeightUpdate and owes it to every registered peer until it is queued;
    a peer registers with Ready (or any heartbeat, e.g. after a learner restart) and is
    forgotten after peer_timeout_s of silence. Call poll() regularly."""

    def __init__(self, address: str, *, bind: bool = True, peer_timeout_s: float = 30.0,
                 sndhwm: int = 4, max_message_bytes: int = SMALL_MAX_BYTES, max_update_bytes: int = CONTROL_MAX_BYTES,
                 max_frames_per_poll: int = 256, ctx: zmq.Context | None = None):
        """max_update_bytes: the largest WeightUpdate sent, what ControlClient takes by default."""
        self.codec = Codec(max_message_bytes)
        self.max_update_bytes = max_update_bytes
        self.peer_timeout_s = peer_timeout_s
        self.max_frames_per_poll = max_frames_per_poll
        self.latest: WeightUpdate | None = None
        self.peers: dict[bytes, Peer] = {}
        self._latest_frames: list[bytes] = []
        self._shutdown_frame: bytes | None = None
        # HANDOVER: an explorer restarted under the same name takes over its old identity.
        self.socket = make_socket(ctx, zmq.ROUTER, address, bind, max_message_bytes=max_message_bytes,
                                   SNDHWM=sndhwm, ROUTER_MANDATORY=1, ROUTER_HANDOVER=1)

    def publish(self, update: WeightUpdate) -> None:
        """Make update the latest and queue it to every registered peer that can take it.
        An update over max_update_bytes is refused (UpdateTooLarge): no explorer would take it."""
        # Encoded once for all peers; the weights are a frame of their own, sent from the
        # bytes object itself rather than copied into the encoded message.
        header = self.codec.encode(msgspec.structs.replace(update, adapter_weights=b""))
        if (size := len(header) + len(update.adapter_weights)) > self.max_update_bytes:
            raise UpdateTooLarge(
                f"the adapter of version {update.version} is {size:,} bytes ({size / 2**20:.1f} MiB), over the "
                f"{self.max_update_bytes:,} bytes ({self.max_update_bytes / 2**20:.1f} MiB) a WeightUpdate may carry "
                "to the explorers (transport.CONTROL_MAX_BYTES): lower learner.rank, or train fewer modules "
                "(learner.train_mlp, learner.train_unembed)")
        self.latest = update
        self._latest_frames = [header, update.adapter_weights] if update.adapter_weights else [header]
        self._sync()

    def poll(self, timeout_s: float = 0.0) -> int:
        """Handle Ready/Heartbeat messages (waiting up to timeout_s for the first one), forget
        silent peers, and retry owed sends. Returns the number of messages handled.

        Takes at most max_frames_per_poll frames, garbage included: the learner's loop calls
        this between steps, and a flood on the control socket must not hold it here. The rest
        waits for the next call, in order."""
        handled = 0
        deadline = time.monotonic() + timeout_s
        for _ in range(self.max_frames_per_poll):
            if (frames := _recv(self.socket, deadline)) is None:
                break
            deadline = 0.0  # after the first message, only drain what is already there
            match self.codec.decode(frames[-1]) if len(frames) == 2 else self.codec.reject("framing"):
                case Ready(sender=name) | Heartbeat(sender=name) as msg:
                    handled += 1
                    self._seen(frames[0].bytes, name, msg)
                    if self._shutdown_frame is not None:
                        self._try_send(frames[0].bytes, [self._shutdown_frame])
                case None:
                    pass  # already counted as rejected
                case _:
                    self.codec.reject("unexpected")
        self._expire()
        self._sync()
        return handled

    def shutdown(self, reason: str = "", run_id: str = "") -> None:
        """Tell every registered peer to stop, and from now on any peer that shows up (a
        Ready or heartbeat seen by a later poll()): one that registers late is not left running."""
        self._shutdown_frame = self.codec.encode(Shutdown(reason=reason, run_id=run_id))
        for ident in list(self.peers):
            self._try_send(ident, [self._shutdown_frame])

    def _seen(self, ident: bytes, name: str, msg: Ready | Heartbeat) -> None:
        now = time.monotonic()
        peer = self.peers.get(ident)
        if peer is None or isinstance(msg, Ready):
            # New or (re)starting peer: whatever we sent before may be gone, so owe it again.
            peer = self.peers[ident] = Peer(name=name, last_seen=now)
        peer.last_seen = now
        if isinstance(msg, Heartbeat):
            peer.version = msg.version

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.peer_timeout_s
        for ident, peer in list(self.peers.items()):
            if peer.last_seen < cutoff:
                log.info("forgetting silent peer %s", peer.name)
                del self.peers[ident]

    def _sync(self) -> None:
        if self.latest is None or self._shutdown_frame is not None:
            return
        for ident, peer in list(self.peers.items()):
            if peer.sent_version < self.latest.version and self._try_send(ident, self._latest_frames):
                peer.sent_version = self.latest.version

    def _try_send(self, ident: bytes, frames: list[bytes]) -> bool:
        try:
            self.socket.send_multipart([ident, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False  # peer's queue full: still owed, retried on the next poll/publish
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.peers.pop(ident, None)  # disconnected; it re-registers when it comes back
            return False


class ControlClient(_Closing):
    """Explorer side of the control channel: DEALER, connected, named by `sender`.

    Sends Ready on connect (ZeroMQ queues it until the connection is up, so a learner that
    starts later still gets it) and a Heartbeat every heartbeat_s while recv() runs."""

    def __init__(self, address: str, sender: str, *, heartbeat_s: float = 2.0,
                 max_message_bytes: int = CONTROL_MAX_BYTES, ctx: zmq.Context | None = None):
        self.sender = sender
        self.heartbeat_s = heartbeat_s
        self.version = -1
        """Adapter version this explorer runs; reported in heartbeats. Set it after loading."""
        self.codec = Codec(max_message_bytes)
        self.socket = make_socket(ctx, zmq.DEALER, address, False, max_message_bytes=max_message_bytes,
                                   linger_ms=0, SNDHWM=4, ROUTING_ID=sender.encode())
        self.socket.send(self.codec.encode(Ready(sender=sender)), zmq.NOBLOCK)  # queue is empty
        self._next_heartbeat = time.monotonic() + heartbeat_s

    def recv(self, timeout_s: float) -> Message | None:
        """The next WeightUpdate or Shutdown from the learner, or None after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._heartbeat(now)
            frames = _recv(self.socket, min(deadline, self._next_heartbeat))
            if frames is not None:
                if (msg := decode_control(self.codec, frames)) is not None:
                    return msg
            elif time.monotonic() >= deadline:
                return None

    def _heartbeat(self, now: float) -> None:
        self._next_heartbeat = now + self.heartbeat_s
        beat = Heartbeat(sender=self.sender, time=time.time(), version=self.version)
        try:
            self.socket.send(self.codec.encode(beat), zmq.NOBLOCK)
        except zmq.Again:
            pass  # heartbeats are disposable: learner away and queue full, skip this one
