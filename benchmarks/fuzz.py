"""Malformed frames against every socket a role binds: the buffer's experience and batch
ROUTERs (a real serve() thread) and the learner's control ROUTER (transport.ControlServer).

    python benchmarks/fuzz.py [--frames 10000] [--seed 0]

Per socket it sends --frames frames of these kinds, in random order: random bytes, truncated
msgpack, valid msgpack of the wrong shape, unknown "type" tags, huge length claims, NaN/inf
values, negative / out-of-vocabulary / 2**64-1 token ids, mismatched list lengths, valid
messages of the wrong type, wrong framing (number of frames) and oversize frames.

It checks that no role died, that every frame was counted: rejected by reason, or, for a
well-formed group with bad values, dropped "invalid" and acknowledged; that the learner got
its batches while the experience socket was flooded; and that each socket still serves a
valid request correctly afterwards. Then it prints the tally per socket and reason, and
"crashes: 0". tests/test_fuzz.py runs the same with a few hundred frames per socket.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import zmq

from rlpipe.pipeline.buffer import read_stats, serve
from rlpipe.pipeline.transport import ControlClient, ControlServer, RequestClient, tcp_address
from rlpipe.types import (
    Batch,
    BatchRequest,
    GroupAck,
    Message,
    Heartbeat,
    Shutdown,
    Trajectory,
    TrajectoryGroup,
    WeightUpdate,
)

VOCAB = 1000
RUN_ID = "fuzz-run"
MAX_BYTES = 64 << 10  # the experience and control sockets' limit here: oversize frames stay cheap
BATCH_MAX_BYTES = 1 << 20  # the batch socket's (transport.SMALL_MAX_BYTES)
SOCKETS = ("experience", "batches", "control")

encode = msgspec.msgpack.encode


def good_group(gid: str, **changes) -> TrajectoryGroup:
    fields = dict(tokens=[5, 6, 7, 8], action_mask=[0, 0, 1, 1], sampling_logprobs=[0.0, 0.0, -0.5, -1.0],
                  policy_versions=[-1, -1, 0, 0], reward=1.0, advantage=0.5)
    fields.update(changes)
    return TrajectoryGroup(group_id=gid, trajectories=[Trajectory(**fields)], run_id=RUN_ID, incarnation=1)


def _bad_values(rng, gid: str) -> TrajectoryGroup:
    """A well-formed group with values no learner may train on."""
    bad = [dict(reward=math.nan), dict(advantage=-math.inf), dict(sampling_logprobs=[0.0, 0.0, math.nan, -1.0]),
           dict(sampling_logprobs=[0.0, 0.0, math.inf, -1.0]), dict(tokens=[5, -3, 7, 8]),
           dict(tokens=[5, 6, VOCAB + int(rng.integers(10**6)), 8]), dict(tokens=[5, 6, 2**64 - 1, 8]),
           dict(action_mask=[0, 1, 1]), dict(policy_versions=[-1, 0]), dict(sampling_logprobs=[]),
           dict(tokens=[], action_mask=[], sampling_logprobs=[], policy_versions=[])]
    return good_group(gid, **bad[int(rng.integers(len(bad)))])


def _valid_message(socket: str, rng, gid: str) -> bytes:
    """A well-formed message this socket does not take."""
    wrong = {"experience": [Heartbeat(sender="x", time=1.0), BatchRequest(sender="x", learner_version=0, after_seq=0,
                                                                          max_groups=1), Shutdown()],
             "batches": [Heartbeat(sender="x", time=1.0), Batch(groups=[], seqs=[]), GroupAck(group_id="g", outcome="x"),
                         good_group(gid), Shutdown(reason="x", run_id="another-run")],  # only this run's learner stops it
             "control": [good_group(gid), BatchRequest(sender="x", learner_version=0, after_seq=0, max_groups=1),
                         Shutdown(), WeightUpdate(version=1, adapter_config=b"{}", adapter_weights=b"")]}[socket]
    return encode(wrong[int(rng.integers(len(wrong)))])


def _nan_frame(socket: str, rng, gid: str) -> bytes:
    if socket == "experience":
        return encode(_bad_values(rng, gid))
    value = float(rng.choice([math.nan, math.inf, -math.inf]))
    if socket == "batches":  # ints as floats: schema errors
        return encode({"type": "batch_request", "sender": "x", "learner_version": value, "after_seq": 0, "max_groups": 1})
    return encode({"type": "heartbeat", "sender": "x", "time": 1.0, "version": value})


def _wrong_shape(rng) -> bytes:
    shapes = [1, -7, "text", [1, 2, 3], None, True, 2.5, {"no": "type"}, {"type": "group"},
              {"type": "group", "group_id": 5, "trajectories": "x"},
              {"type": "group", "group_id": "g", "trajectories": [{"tokens": "abc"}]},
              {"type": "batch_request", "sender": [], "learner_version": "v"}, {"type": "heartbeat"},
              {"type": "ready", "sender": {"a": 1}}, [[["deep"]]] * 3, {"type": 7}]
    return encode(shapes[int(rng.integers(len(shapes)))])


HUGE_CLAIMS = [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff\x01", b"\xc6\xff\xff\xff\xff",
               b"\x82\xa4type\xa5group\xactrajectories\xdd\xff\xff\xff\xff\x90",
               b"\x82\xa4type\xa5group\xa8group_id\xdb\x7f\xff\xff\xffabc"]


def payload(socket: str, kind: str, rng, gid: str) -> bytes:
    match kind:
        case "random_bytes":
            return rng.bytes(int(rng.integers(0, 96)))
        case "truncated":
            whole = encode(good_group(gid)) if socket == "experience" else _valid_message(socket, rng, gid)
            return whole[:int(rng.integers(1, len(whole)))]
        case "wrong_shape":
            return _wrong_shape(rng)
        case "unknown_tag":
            return encode({"type": f"no-such-{int(rng.integers(1000))}", "group_id": gid})
        case "huge_length":
            return HUGE_CLAIMS[int(rng.integers(len(HUGE_CLAIMS)))]
        case "nan_inf":
            return _nan_frame(socket, rng, gid)
        case "bad_tokens":  # on the other sockets: a group where none belongs
            return encode(_bad_values(rng, gid))
        case "wrong_type":
            return _valid_message(socket, rng, gid)
        case "foreign":  # well-formed, but another run's
            if socket == "batches":
                return encode(BatchRequest(sender="x", learner_version=0, after_seq=0, max_groups=10**9, run_id="other",
                                           incarnation=2**64 - 1, durable_seq=2**63))
            if socket == "experience":  # dropped "other_run" and acknowledged
                return encode(msgspec.structs.replace(good_group(gid), run_id="another-run"))
            return encode(Heartbeat(sender="x", time=math.nan))  # control: a heartbeat, odd but handled
        case "oversize":
            limit = BATCH_MAX_BYTES if socket == "batches" else MAX_BYTES
            return encode(Heartbeat(sender="x" * (limit + 100), time=0.0))
    raise ValueError(kind)


KINDS = ["random_bytes", "truncated", "wrong_shape", "unknown_tag", "huge_length", "nan_inf", "bad_tokens",
         "wrong_type", "foreign", "framing", "oversize"]


def multipart(socket: str, rng, i: int) -> tuple[str, list[bytes]]:
    """(kind, frames as a DEALER sends them) for the i-th frame against `socket`."""
    weights = np.array([1.0] * len(KINDS))
    weights[KINDS.index("oversize")] = 0.1  # cheap enough, but 1 MB each on the batch socket
    kind = KINDS[int(rng.choice(len(KINDS), p=weights / weights.sum()))]
    gid = f"fuzz-{socket}-{i}"
    if kind == "framing":  # a frame too many or too few (ROUTER: [peer, request id, message])
        data = encode(good_group(gid))
        frames = [[data], [b"id", b"x", data], [b"a", b"b", b"c", b"d"]]
        if socket == "control":
            frames = [[b"id", data], [b"a", b"b", b"c"]]
        return kind, frames[int(rng.integers(len(frames)))]
    data = payload(socket, kind, rng, gid)
    return kind, [data] if socket == "control" else [i.to_bytes(8, "little"), data]


# --------------------------------------------------------------------------- the roles under fire


@dataclass
class Roles:
    buffer_dir: Path
    experience: str = field(default_factory=tcp_address)
    batches: str = field(default_factory=tcp_address)
    control: str = field(default_factory=tcp_address)
    errors: list = field(default_factory=list)
    control_rejected: Counter = field(default_factory=Counter)
    control_handled: int = 0

    def start(self) -> Roles:
        self._stop, ready, self._publish = threading.Event(), threading.Event(), threading.Event()
        self._buffer = threading.Thread(target=self._guard, args=(self._serve, ready), daemon=True)
        self._control = threading.Thread(target=self._guard, args=(self._control_loop, ready), daemon=True)
        self._buffer.start()
        assert ready.wait(30)
        ready.clear()
        self._control.start()
        assert ready.wait(30)
        return self

    def _guard(self, fn, ready) -> None:
        try:
            fn(ready)
        except BaseException as err:  # noqa: BLE001  (a crash: counted and reported, not raised in a thread)
            self.errors.append(err)

    def _serve(self, ready) -> None:
        serve(self.buffer_dir, self.experience, self.batches, vocab_size=VOCAB, max_staleness=4, run_id=RUN_ID,
              max_message_bytes=MAX_BYTES, stop=self._stop, ready=ready)

    def _control_loop(self, ready) -> None:
        with ControlServer(self.control, max_message_bytes=MAX_BYTES) as server:
            ready.set()
            while not self._stop.is_set():
                self.control_handled += server.poll(0.05)
                self.control_rejected = Counter(server.codec.rejected)
                if self._publish.is_set():
                    self._publish.clear()
                    server.publish(WeightUpdate(version=7, adapter_config=b"{}", adapter_weights=b"w", run_id=RUN_ID))

    def alive(self) -> bool:
        return self._buffer.is_alive() and self._control.is_alive()

    def publish(self) -> None:
        self._publish.set()

    def stop(self) -> None:
        self._stop.set()
        self._buffer.join(30)
        self._control.join(30)


def counted(roles: Roles, socket: str) -> tuple[Counter, int]:
    """(rejected by reason, frames taken as what they claim to be) so far on this socket's role:
    groups decided (experience), requests answered (none in a flood), messages handled (control)."""
    if socket == "control":
        return Counter(roles.control_rejected), roles.control_handled
    stats = read_stats(roles.buffer_dir)
    return Counter(stats["rejected"]), stats["received"] + stats["duplicates"]


def flood(roles: Roles, socket: str, n: int, rng, timeout_s: float = 300.0) -> dict:
    """Send n frames at one socket; wait until each is counted. Returns the tally."""
    address = getattr(roles, socket)
    rejected_before, decided_before = counted(roles, socket)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDTIMEO, 30_000)  # a send that blocks this long is a stuck role
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    kinds, acks, latencies = Counter(), Counter(), []
    learner = _Learner(roles.batches) if socket == "experience" else None  # is it starved?
    deadline = time.monotonic() + timeout_s
    try:
        for i in range(n):
            kind, frames = multipart(socket, rng, i)
            kinds[kind] += 1
            sock.send_multipart(frames)
            acks.update(_drain_acks(sock))
            if learner is not None and i % 200 == 0:
                latencies.append(learner.ask())
        while time.monotonic() < deadline:
            acks.update(_drain_acks(sock))
            rejected, decided = counted(roles, socket)
            total = sum((rejected - rejected_before).values()) + decided - decided_before
            if total >= n and (socket != "experience" or sum(acks.values()) >= decided - decided_before):
                break
            time.sleep(0.05)
    finally:
        sock.close()
        if learner is not None:
            learner.close()
    rejected, decided = counted(roles, socket)
    return {"sent": n, "kinds": dict(kinds), "rejected": dict(rejected - rejected_before),
            "groups": decided - decided_before, "acks": dict(acks),
            "max_batch_latency_s": max(latencies, default=0.0)}


def _drain_acks(sock) -> Counter:
    """Replies by kind: a GroupAck's outcome, or the reply's tag (a refused BatchRequest is
    answered with a Shutdown saying why)."""
    acks = Counter()
    while sock.poll(0):
        *_, data = sock.recv_multipart()
        match msgspec.msgpack.decode(data, type=Message):
            case GroupAck(outcome=outcome):
                acks[outcome] += 1
            case reply:
                acks[f"reply:{reply.__struct_config__.tag}"] += 1
    return acks


class _Learner:
    def __init__(self, address: str):
        self.client = RequestClient(address)

    def ask(self) -> float:
        start = time.monotonic()
        reply = self.client.request(BatchRequest(sender="learner", learner_version=0, after_seq=10**9, max_groups=1,
                                                 run_id=RUN_ID), timeout_s=10.0)
        assert isinstance(reply, Batch), f"the learner got {reply!r} during the flood"
        return time.monotonic() - start

    def close(self) -> None:
        self.client.close()


def still_serves(roles: Roles) -> None:
    """After the floods: each socket answers a valid request correctly."""
    with RequestClient(roles.experience) as explorer:
        ack = explorer.request(good_group("after-the-flood"), timeout_s=10)
        assert ack == GroupAck(group_id="after-the-flood", outcome="accepted"), ack
    with RequestClient(roles.batches) as learner:
        batch = learner.request(BatchRequest(sender="learner", learner_version=0, after_seq=0, max_groups=10,
                                             run_id=RUN_ID, incarnation=1), timeout_s=10)
        assert isinstance(batch, Batch) and [g.group_id for g in batch.groups] == ["after-the-flood"], batch
    client = ControlClient(roles.control, "explorer-after-the-flood")
    try:
        deadline = time.monotonic() + 10
        roles.publish()
        while time.monotonic() < deadline:
            if isinstance(update := client.recv(0.2), WeightUpdate):
                assert update.version == 7
                break
            roles.publish()  # in case the Ready arrived after the first publish
        else:
            raise AssertionError("the control socket did not deliver a WeightUpdate after the flood")
    finally:
        client.close()


def run(frames: int, seed: int, buffer_dir: Path) -> dict:
    """Flood each socket in turn; returns {socket: tally, "crashes": n}."""
    rng = np.random.default_rng(seed)
    roles = Roles(buffer_dir).start()
    out = {}
    try:
        for socket in SOCKETS:
            out[socket] = flood(roles, socket, frames, rng)
            if not roles.alive():
                break
        if roles.alive():
            still_serves(roles)
    finally:
        crashed = not roles.alive()
        roles.stop()
    out["crashes"] = len(roles.errors) + (crashed and not roles.errors)
    out["errors"] = [repr(e) for e in roles.errors]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=10000, help="frames per socket")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # every rejection warns (1st, 2nd, 4th, ...): not here
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        out = run(args.frames, args.seed, Path(d) / "buffer")
    for socket in SOCKETS:
        if socket not in out:
            continue
        t = out[socket]
        counted_total = sum(t["rejected"].values()) + t["groups"]
        print(f"{socket}: {t['sent']} frames sent, {counted_total} counted"
              + (f", learner's slowest batch during the flood {t['max_batch_latency_s']:.2f} s"
                 if socket == "experience" else ""))
        for reason, n in sorted(t["rejected"].items(), key=lambda kv: -kv[1]):
            print(f"    rejected {reason:14s} {n:6d}")
        if socket == "experience":
            print(f"    groups decided     {t['groups']:6d}   acknowledged: {t['acks']}")
        elif t["groups"]:
            print(f"    handled            {t['groups']:6d}   (well-formed Ready/Heartbeat)")
    print(f"crashes: {out['crashes']}" + (f"  {out['errors']}" if out["errors"] else ""))
    print(f"({time.monotonic() - start:.0f} s)")
    ok = out["crashes"] == 0 and all(sum(out[s]["rejected"].values()) + out[s]["groups"] == out[s]["sent"]
                                     for s in SOCKETS)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
