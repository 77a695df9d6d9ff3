"""The experience buffer: validate, deduplicate, persist, bound staleness, serve batches.

(About 460 lines, over the 400 a module keeps to: the buffer's logic and its process role,
which tests, benchmarks and the explorer import from here; the role half, from _take on,
could be a module of its own.)

`ExperienceBuffer` is the whole logic as a plain in-process class; `serve()` runs it as its own
role (`run_buffer()` is `rlpipe buffer`: serve() supervised, its figures in buffer_stats.json): a ROUTER socket where explorers send TrajectoryGroups (each answered with a GroupAck)
and CreditRequests (answered from the global admission budget, rlpipe/pipeline/admission.py,
which follows the learner through its requests), and a ROUTER socket where the learner sends
BatchRequests.

The store is the state (rlpipe/pipeline/store.py: SQLite in WAL mode, chosen by measurement
in benchmarks/bench_buffer_store.py). Every decision is one row in one transaction with the
counters it changes, so a restarted buffer simply opens the store again: nothing to replay.

Delivery (explorer -> buffer is at-least-once, the buffer makes it exactly-once):
- A group is decided by its group_id, never by its bytes: the first copy is accepted (it gets
  the next sequence number, seq) or dropped with a reason; every later copy, across restarts
  and after its payload was compacted away, is answered "duplicate" and counted only there.
- The GroupAck is sent only after the transaction holding the decision has committed with
  synchronous=FULL (on disk, not only in the OS): a killed buffer, or a machine that loses
  power, loses nothing it acknowledged. Unacknowledged groups are re-sent by the explorer.
- The learner pulls "the groups after seq N" and may ask again (after a restart, from its
  checkpoint's position): serving is idempotent. Once a learner's newest checkpoint covers
  seq N (BatchRequest.durable_seq), the payloads up to N are deleted (compaction); their ids
  and every counter stay.

Accounting (holds at every moment, across restarts, tested):

    received == accepted + sum(dropped[r] for r != "stale")
    dropped["stale"] == sum(stale_reasons.values()) <= accepted

received counts distinct groups (not duplicates, not frames that were no group at all: those
are `rejected[reason]`). Groups are dropped at intake (env_error, invalid, no_signal,
other_run, other_incarnation) or, having been accepted, at serve time when they would be
trained at the wrong version (stale: too_old, future_version, other_incarnation).

Staleness is per token (is_stale): a group is served at learner version u only if its action
tokens' token-weighted mean lag is at most max_staleness and none is newer than u.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec
import zmq

from rlpipe.pipeline.admission import Admission
from rlpipe.pipeline.store import Store, figures, read_bodies, read_stats, seen_group_ids, store_bytes
from rlpipe.pipeline.transport import EXPERIENCE_MAX_BYTES, Codec, RequestServer
from rlpipe.pipeline.validation import (
    MAX_GROUP_ID,
    MAX_INT64,
    check,
    checked_decoder,
    drop_reason,
    explain,
    why_dropped,
    group_versions,
    oldest_version,
    validate,
)
from rlpipe.types import Batch, BatchRequest, CreditGrant, CreditRequest, GroupAck, Shutdown, TrajectoryGroup

# The helpers the explorer and `rlpipe stats` use live next to what they serve; found here too.
__all__ = [
    "ExperienceBuffer",
    "drop_reason",
    "group_versions",
    "is_stale",
    "oldest_version",
    "read_groups",
    "read_stats",
    "seen_group_ids",
    "serve",
    "validate",
]

log = logging.getLogger(__name__)

SHUTDOWN_LINGER_S = 0.5  # how long the batch socket stays open after acknowledging a Shutdown
STATS_FILE = "buffer_stats.json"
"""In the run directory: the buffer's stats() as `rlpipe buffer` last wrote them (run_buffer)."""

_group_decoder = msgspec.msgpack.Decoder(TrajectoryGroup)


def is_stale(group_version: int, learner_version: int, max_staleness: int) -> bool:
    """THE staleness rule of rlpipe, per token: a group is trained at learner version u only
    if the token-weighted mean lag of its action tokens, u - mean(v), is at most max_staleness.
    group_version is the floor of that mean (validation.Versions.version), for which
    u - floor(mean) <= S holds exactly when u - mean <= S. The oldest token's lag is not
    bounded, only reported (staleness/max); docs/pipeline.md, "Staleness", says why. Applied
    in one place, ExperienceBuffer.batch(), at the moment a group would be served (with the
    rules that no token may be from the learner's future and no group from another learner
    incarnation). A group whose every action token has one version (no in-flight update
    reached it) is bounded exactly as before: by that version."""
    return learner_version - group_version > max_staleness


@dataclass(slots=True)
class IncomingGroup:
    """A group as the buffer's intake sees it, before the store decides it."""

    group_id: str
    reason: str | None  # why it must be dropped whatever the store holds, or None
    detail: str | None
    run_id: str
    incarnation: int
    version: int  # floor of its action tokens' mean policy version (accepted groups): the one bounded
    body: bytes | memoryview | None  # the msgpack TrajectoryGroup to store
    explorer_id: str = ""
    newest: int = 0  # its newest action token's version: none may be from the learner's future

    @property
    def keyed(self) -> bool:
        return 0 < len(self.group_id) <= MAX_GROUP_ID


# --------------------------------------------------------------------------- the buffer


class ExperienceBuffer:
    """Validated, deduplicated, persisted, sequence-numbered groups, served in seq order."""

    def __init__(self, buffer_dir: str | os.PathLike, *, vocab_size: int, max_staleness: int = 4,
                 drop_no_signal: bool = False, run_id: str = "", synchronous: str = "FULL"):
        self.vocab_size = vocab_size
        self.max_staleness = max_staleness
        self.drop_no_signal = drop_no_signal
        """Drop groups whose trajectories all have the same reward (zero advantage everywhere)."""
        self.store = Store(buffer_dir, run_id=run_id, synchronous=synchronous)
        self.run_id = self.store.run_id
        """The run this buffer belongs to ("" = any); groups and requests of others are refused."""
        self._decoder = checked_decoder(vocab_size)
        # synchronous: "FULL" (a committed decision survives a power cut: what serve() uses)
        # or "NORMAL" (it survives a killed process only; for measurements).

    # ------------------------------------------------------------------ intake

    def add(self, group: TrajectoryGroup) -> str:
        """Decide one group and commit: "accepted", "duplicate" or the drop reason."""
        return self.add_many([group])[0]

    def add_many(self, groups: Iterable[TrajectoryGroup]) -> list[str]:
        """Decide several groups in one transaction (one fsync); outcomes in order."""
        return self.decide([self._examined(*check(g, self.vocab_size)) for g in groups])

    def examine_frame(self, frame: zmq.Frame | bytes, codec: Codec) -> IncomingGroup | CreditRequest | None:
        """A frame from the experience socket as a group to decide, an explorer's request for
        credits (rlpipe/pipeline/admission.py), or None when it is neither (then counted in
        codec's rejections, which feed `rejected`)."""
        data = frame.buffer if isinstance(frame, zmq.Frame) else frame
        if len(data) > codec.max_message_bytes:
            return codec.reject("oversize")
        try:
            msg, problem = self._decoder.decode(data), None
        except msgspec.MsgspecError as err:
            # Slow path, bad frames only: a group with bad values is a group (dropped as
            # invalid, acknowledged), anything else is rejected by the codec with its reason.
            msg, problem = codec.decode(data), explain(err, self.vocab_size)
            if msg is None:
                return None
        if isinstance(msg, CreditRequest):
            return msg
        if msg.__struct_config__.tag != "group":
            return codec.reject("unexpected")
        return self._examined(msg, problem, data)

    def decide(self, items: list[IncomingGroup]) -> list[str]:
        """The store's decision on each item, committed (durably) before this returns."""
        store, outcomes = self.store, []
        with store.transaction():
            for item in items:
                reason = self._identity_reason(item) or item.reason
                if item.keyed and not store.decide(item.group_id, reason or "accepted", item.explorer_id[:MAX_GROUP_ID]):
                    store.bump("duplicates")
                    outcomes.append("duplicate")
                    continue
                store.bump("received")
                if reason is not None:
                    store.bump(f"dropped:{reason}")
                    if reason == "invalid" and _power_of_two(store.get("dropped:invalid")):
                        log.warning("invalid group %r (%d so far): %s", item.group_id[:MAX_GROUP_ID],
                                    store.get("dropped:invalid"), item.detail)
                    outcomes.append(reason)
                    continue
                seq = store.get("last_seq") + 1
                store.put(seq, item.version, item.incarnation, item.body, item.newest)
                store.set("last_seq", seq)
                store.bump("accepted")
                outcomes.append("accepted")
            for explorer in {item.explorer_id[:MAX_GROUP_ID] for item in items if item.keyed}:
                store.forget_decisions(explorer)  # keeps the dedup table bounded
        return outcomes

    def reject(self, reason: str) -> None:
        """Count a frame that was no group (not msgpack, unknown type, wrong framing, ...);
        written with the next transaction or flush()."""
        self.store.bump(f"rejected:{reason}")

    def _examined(self, group, problem: str | None, body) -> IncomingGroup:
        reason, detail, versions = why_dropped(group, problem, self.drop_no_signal)
        return IncomingGroup(group.group_id, reason, detail, group.run_id, group.incarnation, versions.version, body,
                        group.explorer_id if isinstance(group.explorer_id, str) else "", versions.newest)

    def _identity_reason(self, item: IncomingGroup) -> str | None:
        if item.run_id and self.run_id and item.run_id != self.run_id:
            return "other_run"
        if item.incarnation < self.store.get("learner_incarnation"):
            return "other_incarnation"  # sampled by a learner that has been replaced since
        return None

    # ------------------------------------------------------------------ serving

    def refusal(self, request: BatchRequest) -> str | None:
        """Why a request must not be served at all: it comes from another run, or from a
        learner incarnation that has been replaced (a zombie must not drop the new one's groups)."""
        if self.run_id and request.run_id != self.run_id:
            return "other_run"
        if 0 < request.incarnation < self.store.get("learner_incarnation"):
            return "old_incarnation"
        if request.incarnation > MAX_INT64:
            return "schema"  # a msgpack int the store cannot hold: no learner sends that
        return None

    def batch(self, request: BatchRequest) -> Batch:
        """The next groups after request.after_seq in seq order. Idempotent: the same after_seq
        gets the same groups again (minus any dropped meanwhile). A group that would be trained
        at the wrong version is never served: its payload is deleted and it is counted stale,
        once. Everything up to request.durable_seq is compacted away."""
        if (why := self.refusal(request)) is not None:
            raise ValueError(f"batch request refused: {why} (run {request.run_id!r}, incarnation {request.incarnation})")
        store = self.store
        after = min(max(request.after_seq, 0), MAX_INT64)
        limit = min(max(request.max_groups, 0), MAX_INT64)
        served: list[int] = []
        with store.transaction():
            if request.incarnation > store.get("learner_incarnation"):
                store.set("learner_incarnation", request.incarnation)
            # Never beyond what exists: a bogus durable_seq must not delete groups yet to come.
            durable = min(request.durable_seq, store.get("last_seq"))
            compacted = durable > store.get("durable_seq")
            if compacted:
                store.compact(durable)
                store.set("durable_seq", durable)
            replaced = False
            while not replaced and len(served) < limit and (rows := store.candidates(after, limit - len(served))):
                for seq, version, incarnation, newest in rows:
                    if 0 < request.incarnation < incarnation:
                        # A newer learner's group: the requester has been replaced (a zombie on
                        # another host). It gets nothing more, and the group is kept for the new one.
                        replaced = True
                        break
                    if (why := self._serve_reason(version, newest, incarnation, request)) is not None:
                        store.forget(seq)
                        store.bump(f"stale:{why}")
                    else:
                        served.append(seq)
                    after = seq
            bodies = [store.body(seq) for seq in served]
        if compacted:
            store.vacuum()
        dropped = figures(store.values, 0, self.run_id)["dropped"]
        return Batch(groups=[_group_decoder.decode(b) for b in bodies], seqs=served, dropped=dropped)

    def _serve_reason(self, version: int, newest: int, incarnation: int, request: BatchRequest) -> str | None:
        if request.incarnation > 0 and incarnation != request.incarnation:
            return "other_incarnation"
        if newest > request.learner_version:
            return "future_version"
        if is_stale(version, request.learner_version, self.max_staleness):
            return "too_old"
        return None

    # ------------------------------------------------------------------ figures

    def stats(self) -> dict:
        return {**figures(self.store.values, self.store.in_store(), self.run_id),
                "store_bytes": store_bytes(self.store.dir)}

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        self.store.close()


def _power_of_two(n: int) -> bool:
    return n & (n - 1) == 0  # the 1st, 2nd, 4th, ...: a broken env cannot flood the log


def read_groups(buffer_dir: str | os.PathLike) -> list[TrajectoryGroup]:
    """The groups still in the store (accepted, not yet compacted or dropped stale), in seq
    order, read without disturbing a running buffer: for tests and inspection."""
    return [_group_decoder.decode(body) for body in read_bodies(buffer_dir)]


# --------------------------------------------------------------------------- the process role

def _take(server: RequestServer, limit: int) -> list[tuple[tuple[bytes, bytes], zmq.Frame]]:
    """Up to `limit` queued requests, without waiting; each frame counts toward the limit,
    garbage included, so a flood on one socket cannot starve the other."""
    taken = []
    for _ in range(limit):
        try:
            frames = server.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            break
        if len(frames) != 3:  # peer identity, request id, message
            server.codec.reject("framing")
        else:
            taken.append(((frames[0].bytes, frames[1].bytes), frames[2]))
    return taken


def _intake(server: RequestServer, buf: ExperienceBuffer, limit: int, admission: Admission | None = None) -> int:
    """One intake round: decide what is queued in one transaction, then acknowledge each
    group (only now: its decision is on disk), then answer credit requests (after the groups
    they may have been waiting for are counted). Returns the number of frames taken."""
    taken = _take(server, limit)
    items = [(to, item) for to, frame in taken if (item := buf.examine_frame(frame, server.codec)) is not None]
    groups = [(to, item) for to, item in items if isinstance(item, IncomingGroup)]
    outcomes = buf.decide([item for _, item in groups])
    for (to, item), outcome in zip(groups, outcomes):
        # A lost ack costs a re-send, answered "duplicate": nothing to do if the peer is gone.
        server.reply(to, GroupAck(group_id=item.group_id, outcome=outcome))
    for to, item in items:
        if isinstance(item, CreditRequest):  # no budget (admission None): every credit asked for
            server.reply(to, admission.grant(item, buf.store.count_after) if admission is not None
                         else CreditGrant(start_until=item.started + item.want, lease_s=3600.0))
    return len(taken)


def _answer(server: RequestServer, buf: ExperienceBuffer, limit: int,
            admission: Admission | None = None) -> tuple[tuple[bytes, bytes], str] | None:
    """Answer queued BatchRequests (each tells admission where the learner is); returns
    (requester, reason) if one asked to shut down."""
    for to, frame in _take(server, limit):
        match server.codec.decode(frame):
            case BatchRequest() as request:
                if (why := buf.refusal(request)) is not None:
                    # Counted, and answered with the reason: a learner of another run, or one
                    # whose incarnation was replaced, stops at once instead of timing out.
                    server.codec.reject(why)
                    server.reply(to, Shutdown(reason=f"refused: {why}: this buffer serves run {buf.run_id!r}, "
                                                     f"learner incarnation {buf.store.get('learner_incarnation')}"))
                else:
                    server.reply(to, buf.batch(request))
                    if admission is not None:
                        admission.learner_at(request)
            case Shutdown(run_id=run_id) if buf.run_id and run_id != buf.run_id:
                server.codec.reject("other_run")  # only this run's learner may stop the buffer
            case Shutdown(reason=reason):
                return to, reason
            case None:
                pass  # counted by the codec
            case _:
                server.codec.reject("unexpected")
    return None


def _linger(server: RequestServer, seconds: float) -> None:
    """Keep the socket open a moment after the last reply: a DEALER with IMMEDIATE set (the
    learner's RequestClient) can lose a reply whose connection closes right behind it
    (measured: up to a fifth of them). A Shutdown asked again meanwhile is acknowledged again."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if server.socket.poll(int(remaining * 1000) + 1, zmq.POLLIN):
            for to, frame in _take(server, 16):
                if isinstance(server.codec.decode(frame), Shutdown):
                    server.reply(to, Shutdown(reason="buffer stopped"))


def serve(buffer_dir: str | os.PathLike, experience_address: str, batch_address: str, *,
          vocab_size: int, max_staleness: int = 4, drop_no_signal: bool = False, run_id: str = "",
          groups_per_batch: int | None = None, oversample: float = 1.0,
          max_message_bytes: int = EXPERIENCE_MAX_BYTES, intake_per_round: int = 64, poll_s: float = 0.05,
          on_stats: Callable[[dict], None] | None = None, stats_interval_s: float = 1.0,
          stop: threading.Event | None = None, ready: threading.Event | None = None) -> dict:
    """Run the buffer role until `stop` is set or a Shutdown request comes; returns stats().

    Binds two ROUTER sockets: experience_address, where explorers' DEALERs send
    TrajectoryGroups and get a GroupAck for each, and batch_address, where the learner sends
    BatchRequests (or Shutdown). At most intake_per_round frames are taken per round, so a
    flood of groups or garbage cannot starve the learner. With groups_per_batch, explorers'
    CreditRequests are answered from the global admission budget (admission.py; oversample is
    buffer.oversample); without, every credit asked for is granted. on_stats(stats()) is
    called every stats_interval_s and at the end, with the budget's figures under "admission"."""
    with contextlib.ExitStack() as closing:
        buf = ExperienceBuffer(buffer_dir, vocab_size=vocab_size, max_staleness=max_staleness,
                               drop_no_signal=drop_no_signal, run_id=run_id)
        closing.callback(buf.close)
        admission = None if groups_per_batch is None else Admission(
            groups_per_batch, max_staleness, run_id=buf.run_id, oversample=oversample)
        groups = closing.enter_context(RequestServer(experience_address, max_message_bytes=max_message_bytes,
                                                     on_reject=buf.reject))
        batches = closing.enter_context(RequestServer(batch_address, on_reject=buf.reject))
        poller = zmq.Poller()
        poller.register(groups.socket, zmq.POLLIN)
        poller.register(batches.socket, zmq.POLLIN)
        if ready is not None:
            ready.set()
        next_stats = time.monotonic()
        while stop is None or not stop.is_set():
            events = dict(poller.poll(int(poll_s * 1000)))
            if groups.socket in events:
                _intake(groups, buf, intake_per_round, admission)
            if batches.socket in events and (shutdown := _answer(batches, buf, 16, admission)) is not None:
                to, reason = shutdown
                log.info("buffer shutting down: %s", reason or "learner asked")
                # What explorers already sent still gets decided and acknowledged (bounded:
                # an explorer that keeps sending is answered by the next buffer, or re-sends).
                deadline = time.monotonic() + 2.0
                while _intake(groups, buf, intake_per_round, admission) and time.monotonic() < deadline:
                    pass
                batches.reply(to, Shutdown(reason="buffer stopped"))  # the acknowledgement
                _linger(batches, SHUTDOWN_LINGER_S)
                break
            buf.flush()  # rejected frames' counters
            if on_stats is not None and time.monotonic() >= next_stats:
                on_stats(_with_admission(buf.stats(), admission))
                next_stats = time.monotonic() + stats_interval_s
        buf.flush()
        final = _with_admission(buf.stats(), admission)
    if on_stats is not None:
        on_stats(final)
    return final


def _with_admission(stats: dict, admission: Admission | None) -> dict:
    return stats if admission is None else {**stats, "admission": admission.stats()}


def run_buffer(config, stop: threading.Event) -> int:
    """`rlpipe buffer`: serve() the run's buffer as a supervised role (role.supervised) until
    the learner's Shutdown (returns 0) or SIGTERM (returns role.EXIT_SIGTERM), with its
    figures in run_dir/buffer_stats.json every second and at the end."""
    from rlpipe.pipeline import identity
    from rlpipe.pipeline.config import vocab_size
    from rlpipe.pipeline.role import EXIT_SIGTERM, supervised
    from rlpipe.training.checkpoint import write_json_atomic

    buffer_dir, stats_path = config.run_dir / "buffer", config.run_dir / STATS_FILE
    admission: dict = {}  # the budget's figures live in memory only: the last ones are kept for the final file

    def write_stats(stats: dict) -> None:
        admission.update({k: v for k, v in stats.items() if k == "admission"})
        write_json_atomic(stats_path, {**stats, **admission}, indent=1)

    try:
        with supervised("buffer", config):
            serve(buffer_dir, config.addresses.experience, config.addresses.batches,
                  vocab_size=vocab_size(config.model_path()), max_staleness=config.max_staleness,
                  drop_no_signal=config.buffer.drop_constant_reward_groups, run_id=identity.run_id(config.run_dir),
                  groups_per_batch=config.groups_per_batch, oversample=config.buffer.oversample,
                  intake_per_round=config.buffer.intake_per_round, on_stats=write_stats, stop=stop)
    except KeyboardInterrupt:  # SIGTERM: not the learner's Shutdown, so not "finished" (exit 143)
        return EXIT_SIGTERM
    finally:
        # However it stopped (SIGTERM, Shutdown, an error): the figures from the store itself,
        # which holds every committed decision. A store that cannot be read keeps the last file.
        try:
            write_stats(read_stats(buffer_dir))
        except Exception as err:  # noqa: BLE001  (must not hide the error that stopped the role)
            log.error("buffer: could not write %s: %s", stats_path, err)
    return 0
