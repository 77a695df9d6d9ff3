"""The experience buffer: validate, persist, bound staleness, serve batches.

`ExperienceBuffer` is the whole logic as a plain in-process class; `serve()` runs it as its
own role, a PULL socket for explorers' TrajectoryGroups and a ROUTER socket for the learner's
BatchRequests.

The log is the state. Everything the buffer decides is appended to one file,
`<log_dir>/experience.log`, as length-prefixed, CRC-checked msgpack records:

    Accepted(seq, group)   a valid group got sequence number seq (1, 2, 3, ...)
    Dropped(reason)        a group or frame was dropped before getting a seq
    Stale(seq)             an accepted group became too stale and will never be served
    Acked(seq)             the learner has trained everything up to seq

so replaying the file on start rebuilds the groups still owed to the learner and every counter.
Durability: each record is written to the OS at once (a killed process loses nothing) and the
file is fsynced after `fsync_every` appends, after `fsync_interval_s`, and always before a batch
is served (the learner never trains on a group the log could still lose). A power cut loses at
most that bounded, never-served tail. A torn last record (crash mid-write) is detected by its
length or CRC, moved aside to `experience.log.corrupt-<offset>`, cut off and counted.

Accounting (holds at every moment, across restarts, tested):

    received == accepted + sum(dropped[r] for r != "stale")
    dropped["stale"] <= accepted        (stale groups were accepted first, then never served)

where `received` counts every frame that arrived on the experience socket, including ones
that never decoded ("malformed") or were not TrajectoryGroups ("unexpected").
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import zmq

from rlpipe.pipeline.transport import EXPERIENCE_MAX_BYTES, Receiver, RequestServer
from rlpipe.types import Batch, BatchRequest, Shutdown, TrajectoryGroup

log = logging.getLogger(__name__)

LOG_NAME = "experience.log"
_HEADER = struct.Struct("<II")  # payload length, crc32 of payload


class Accepted(msgspec.Struct, tag="accepted", array_like=True):
    seq: int
    group: TrajectoryGroup


class Dropped(msgspec.Struct, tag="dropped", array_like=True):
    reason: str


class Stale(msgspec.Struct, tag="stale", array_like=True):
    seq: int


class Acked(msgspec.Struct, tag="acked", array_like=True):
    seq: int


LogRecord = Accepted | Dropped | Stale | Acked

_group_encoder = msgspec.msgpack.Encoder()


# --------------------------------------------------------------------------- validation


def validate(group: TrajectoryGroup, vocab_size: int) -> str | None:
    """Why this group cannot be trained on, or None if it can."""
    try:
        # The schema check that matters: the group as it will be logged must decode again,
        # otherwise one bad record would make the log unreplayable.
        msgspec.msgpack.decode(_group_encoder.encode(group), type=TrajectoryGroup)
    except (TypeError, OverflowError, msgspec.MsgspecError) as e:
        return f"schema: {e}"
    if not group.trajectories:
        return "group has no trajectories"
    for i, traj in enumerate(group.trajectories):
        if (problem := _validate_trajectory(traj, vocab_size)) is not None:
            return f"trajectory {i}: {problem}"
    return None


def _validate_trajectory(traj, vocab_size: int) -> str | None:
    n = len(traj.tokens)
    if n == 0:
        return "no tokens"
    for name in ("action_mask", "sampling_logprobs", "policy_versions"):
        if (m := len(getattr(traj, name))) != n:
            return f"{name} has {m} entries for {n} tokens"
    if not set(traj.action_mask) <= {0, 1}:
        return "action_mask values must be 0 or 1"
    action_versions = [v for v, m in zip(traj.policy_versions, traj.action_mask) if m]
    if not action_versions:
        return "no action tokens"
    if min(action_versions) < 0:
        return "an action token has policy_version < 0"
    if not (math.isfinite(traj.reward) and math.isfinite(traj.advantage)):
        return "reward or advantage is not finite"
    logprobs = np.asarray(traj.sampling_logprobs, dtype=np.float64)
    if not np.isfinite(logprobs).all():
        return "sampling_logprobs has non-finite values"
    if (logprobs > 0).any():
        return "sampling_logprobs has values > 0"
    if min(traj.tokens) < 0 or max(traj.tokens) >= vocab_size:
        return f"token id outside [0, {vocab_size})"
    return None


def drop_reason(group: TrajectoryGroup, vocab_size: int, drop_no_signal: bool) -> tuple[str | None, str | None]:
    """(reason, detail) for a group the buffer will not accept, (None, None) otherwise. The
    explorer applies the same rule to know which of its groups will count toward a batch."""
    if group.failed:
        return "env_error", group.error
    if (problem := validate(group, vocab_size)) is not None:
        return "invalid", problem
    if drop_no_signal and len({t.reward for t in group.trajectories}) == 1:
        return "no_signal", None
    return None, None


def oldest_version(group: TrajectoryGroup) -> int:
    """The policy version of the oldest action token in the group (validated groups only)."""
    return min(v for t in group.trajectories for v, m in zip(t.policy_versions, t.action_mask) if m)


def is_stale(group_version: int, learner_version: int, max_staleness: int) -> bool:
    """THE staleness rule of rlpipe: a group whose oldest action token was sampled by version
    v is trained at learner version u only if u - v <= max_staleness. Applied in one place,
    ExperienceBuffer.batch(), at the moment a group would be served."""
    return learner_version - group_version > max_staleness


# --------------------------------------------------------------------------- the buffer


class ExperienceBuffer:
    """Validated, persisted, sequence-numbered groups, served to the learner in log order."""

    def __init__(self, log_dir: str | os.PathLike, *, vocab_size: int, max_staleness: int = 4,
                 drop_no_signal: bool = False, fsync_every: int = 64, fsync_interval_s: float = 0.05):
        self.vocab_size = vocab_size
        self.max_staleness = max_staleness
        self.drop_no_signal = drop_no_signal
        """Drop groups whose trajectories all have the same reward (zero advantage everywhere)."""
        self.fsync_every = fsync_every
        self.fsync_interval_s = fsync_interval_s

        self.received = 0
        self.accepted = 0
        self.dropped: dict[str, int] = {}
        self.log_truncated = 0
        """Torn records cut off the log tail on start (crash mid-write)."""
        self.last_seq = 0
        self.acked_seq = 0
        # Unacknowledged groups in seq order, with their oldest action version. Acked groups
        # leave memory but stay readable from the log through _offsets.
        self._groups: dict[int, tuple[int, TrajectoryGroup]] = {}
        self._offsets = array("q")  # _offsets[seq - 1]: file offset of that Accepted record
        self._stale: set[int] = set()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(LogRecord)

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(log_dir) / LOG_NAME
        is_new = not self.path.exists()
        self._replay()
        self._file = open(self.path, "ab")
        if is_new:  # make the new file's directory entry durable too
            dir_fd = os.open(log_dir, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)
        self._reader = open(self.path, "rb")
        self._unsynced = 0
        self._unsynced_since = 0.0

    # ------------------------------------------------------------------ intake

    def add(self, group: TrajectoryGroup) -> str | None:
        """Log and accept the group, or count it dropped; returns the drop reason or None."""
        reason, problem = drop_reason(group, self.vocab_size, self.drop_no_signal)
        if reason == "invalid":
            n = self.dropped.get("invalid", 0) + 1
            if n & (n - 1) == 0:  # the 1st, 2nd, 4th, ...: a broken env cannot flood the log
                log.warning("invalid group %r from %r (%d so far): %s", group.group_id,
                            group.explorer_id, n, problem)
        if reason is not None:
            self.drop(reason)
            return reason
        seq = self.last_seq + 1
        offset = self._append(Accepted(seq, group))
        self._apply(Accepted(seq, group), offset)
        return None

    def drop(self, reason: str) -> None:
        """Record (in the log, hence the counters) something that arrived but was not accepted."""
        self._apply(Dropped(reason), self._append(Dropped(reason)))

    # ------------------------------------------------------------------ serving

    def batch(self, request: BatchRequest) -> Batch:
        """The next groups after request.after_seq in log order, dropping those too stale for
        request.learner_version. Idempotent: the same after_seq gets the same groups again
        (minus any that became stale), so a learner that resumes from a checkpoint loses nothing."""
        self.sync()  # serve only what the log can no longer lose
        ack = min(request.after_seq, self.last_seq)
        if ack > self.acked_seq:
            self._apply(Acked(ack), self._append(Acked(ack)))
        groups, seqs = [], []
        for seq, version, group in self._after(request.after_seq):
            if len(groups) >= request.max_groups:
                break
            if is_stale(version, request.learner_version, self.max_staleness):
                self._apply(Stale(seq), self._append(Stale(seq)))
                continue
            groups.append(group)
            seqs.append(seq)
        return Batch(groups=groups, seqs=seqs, dropped=dict(self.dropped))

    def _after(self, after_seq: int) -> Iterator[tuple[int, int, TrajectoryGroup]]:
        # Below the ack floor (a learner resuming from an older checkpoint): read the log.
        for seq in range(max(after_seq, 0) + 1, self.acked_seq + 1):
            if seq not in self._stale:
                group = self._read_group(seq)
                yield seq, oldest_version(group), group
        # Snapshot the keys: marking a group stale removes it while we iterate.
        for seq in [s for s in self._groups if s > after_seq]:
            if seq in self._groups:
                version, group = self._groups[seq]
                yield seq, version, group

    def stats(self) -> dict:
        return {"received": self.received, "accepted": self.accepted, "dropped": dict(self.dropped),
                "last_seq": self.last_seq, "acked_seq": self.acked_seq,
                "in_memory": len(self._groups), "log_truncated": self.log_truncated}

    # ------------------------------------------------------------------ state changes

    def _apply(self, record: LogRecord, offset: int) -> None:
        """The one place state changes, used both live and while replaying the log."""
        match record:
            case Accepted(seq=seq, group=group):
                if seq != self.last_seq + 1:
                    raise RuntimeError(f"{self.path}: record at offset {offset} has seq {seq}, "
                                       f"expected {self.last_seq + 1}")
                self._offsets.append(offset)
                self._groups[seq] = (oldest_version(group), group)
                self.last_seq = seq
                self.received += 1
                self.accepted += 1
            case Dropped(reason=reason):
                self.received += 1
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
            case Stale(seq=seq):
                self._stale.add(seq)
                self._groups.pop(seq, None)
                self.dropped["stale"] = self.dropped.get("stale", 0) + 1
            case Acked(seq=seq):
                self.acked_seq = seq
                for s in list(itertools.takewhile(lambda s: s <= seq, self._groups)):  # seq order
                    del self._groups[s]

    # ------------------------------------------------------------------ the log

    def _append(self, record: LogRecord) -> int:
        payload = self._encoder.encode(record)
        offset = self._file.tell()
        self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self._file.flush()  # into the OS now: a killed process loses nothing
        if self._unsynced == 0:
            self._unsynced_since = time.monotonic()
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            self.sync()
        return offset

    def sync(self) -> None:
        """fsync the log (bounds what a power cut can take)."""
        if self._unsynced:
            os.fsync(self._file.fileno())
            self._unsynced = 0

    def maybe_sync(self) -> None:
        """Call regularly: fsyncs once the oldest unsynced record is fsync_interval_s old."""
        if self._unsynced and time.monotonic() - self._unsynced_since >= self.fsync_interval_s:
            self.sync()

    def close(self) -> None:
        self.sync()
        self._file.close()
        self._reader.close()

    def _read_group(self, seq: int) -> TrajectoryGroup:
        self._reader.seek(self._offsets[seq - 1])
        length, _ = _HEADER.unpack(self._reader.read(_HEADER.size))
        return self._decoder.decode(self._reader.read(length)).group

    def _replay(self) -> None:
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            offset = 0
            while offset < size:
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    break
                length, crc = _HEADER.unpack(header)
                # A torn header can claim any length: check it against the file before reading.
                if offset + _HEADER.size + length > size:
                    break
                payload = f.read(length)
                if zlib.crc32(payload) != crc:
                    break
                try:
                    record = self._decoder.decode(payload)
                except msgspec.DecodeError as e:
                    # The CRC matched, so this is not a torn write but a schema mismatch (a log
                    # from another rlpipe version): fail loudly rather than cut away good data.
                    raise RuntimeError(f"{self.path}: record at offset {offset} does not decode: {e}") from e
                self._apply(record, offset)
                offset += _HEADER.size + length
        if offset < size:
            self._cut_tail(offset)

    def _cut_tail(self, offset: int) -> None:
        aside = self.path.with_name(f"{LOG_NAME}.corrupt-{offset}")
        with open(self.path, "rb") as f:
            f.seek(offset)
            aside.write_bytes(f.read())
        with open(self.path, "r+b") as f:
            f.truncate(offset)
            os.fsync(f.fileno())
        self.log_truncated += 1
        log.warning("%s: torn record at offset %d cut off (kept in %s)", self.path, offset, aside)


# --------------------------------------------------------------------------- the process role


def _intake(pull: Receiver, buf: ExperienceBuffer, limit: int | None) -> None:
    """Take queued groups; a bounded number per round so a flood cannot starve the learner."""
    count = itertools.count()
    while limit is None or next(count) < limit:
        match pull.recv(0.0):
            case None:
                return
            case TrajectoryGroup() as group:
                buf.add(group)
            case _:
                buf.drop("unexpected")


def serve(log_dir: str | os.PathLike, experience_address: str, batch_address: str, *,
          vocab_size: int, max_staleness: int = 4, drop_no_signal: bool = False,
          max_message_bytes: int = EXPERIENCE_MAX_BYTES, poll_s: float = 0.05,
          stop: threading.Event | None = None, ready: threading.Event | None = None) -> dict:
    """Run the buffer role until `stop` is set or a Shutdown request comes; returns stats().

    Binds a PULL socket at experience_address (explorers connect and push TrajectoryGroups)
    and a ROUTER socket at batch_address (the learner connects and sends BatchRequests)."""
    with contextlib.ExitStack() as closing:
        buf = ExperienceBuffer(log_dir, vocab_size=vocab_size, max_staleness=max_staleness,
                               drop_no_signal=drop_no_signal, fsync_interval_s=poll_s)
        closing.callback(buf.close)
        pull = closing.enter_context(Receiver(experience_address, max_message_bytes=max_message_bytes,
                                              on_reject=lambda reason: buf.drop("malformed")))
        router = closing.enter_context(RequestServer(batch_address))
        poller = zmq.Poller()
        poller.register(pull.socket, zmq.POLLIN)
        poller.register(router.socket, zmq.POLLIN)
        if ready is not None:
            ready.set()
        while stop is None or not stop.is_set():
            events = dict(poller.poll(int(poll_s * 1000)))
            # Drain a bounded number of groups so a flood cannot starve the learner.
            if pull.socket in events:
                _intake(pull, buf, limit=256)
            while (request := router.recv(0.0)) is not None:
                match request:
                    case (to, BatchRequest() as req):
                        router.reply(to, buf.batch(req))
                    case (to, Shutdown(reason=reason)):
                        log.info("buffer shutting down: %s", reason or "learner asked")
                        _intake(pull, buf, limit=None)  # what was already sent still counts
                        router.reply(to, Shutdown(reason="buffer stopped"))  # the acknowledgement
                        return buf.stats()
                    case _:
                        router.codec.reject("unexpected")
            buf.maybe_sync()
        return buf.stats()
