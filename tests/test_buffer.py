"""The experience buffer: validation, the log, staleness, idempotent serving, the served role."""

import math
import os
import subprocess
import sys
import threading
import time

import msgspec
import numpy as np
import pytest
import zmq

import rlpipe.pipeline.buffer
from rlpipe.pipeline.buffer import LOG_NAME, ExperienceBuffer, serve, validate
from rlpipe.pipeline.transport import RequestClient, Sender, tcp_address
from rlpipe.types import BatchRequest, Heartbeat, Shutdown, Trajectory, TrajectoryGroup

VOCAB = 100


def traj(version=0, reward=1.0, **changes):
    """Two observation tokens then two action tokens sampled by `version`."""
    fields = dict(tokens=[5, 6, 7, 8], action_mask=[0, 0, 1, 1], sampling_logprobs=[0.0, 0.0, -0.1, -2.0],
                  policy_versions=[-1, -1, version, version], reward=reward, advantage=0.0)
    fields.update(changes)
    return Trajectory(**fields)


def group(gid="g", version=0, rewards=(1.0, 0.0), **changes):
    return TrajectoryGroup(group_id=gid, trajectories=[traj(version, r, **changes) for r in rewards])


def request(after_seq, learner_version=0, max_groups=100):
    return BatchRequest(sender="learner", learner_version=learner_version, after_seq=after_seq,
                        max_groups=max_groups)


def check_accounting(stats):
    dropped = stats["dropped"]
    assert stats["received"] == stats["accepted"] + sum(n for r, n in dropped.items() if r != "stale")
    assert dropped.get("stale", 0) <= stats["accepted"]


@pytest.fixture
def new_buffer(tmp_path):
    made = []

    def make(**kwargs):
        kwargs.setdefault("vocab_size", VOCAB)
        buf = ExperienceBuffer(tmp_path / "log", **kwargs)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        if not buf._file.closed:
            buf.close()


# --------------------------------------------------------------------------- validation

BAD_GROUPS = {
    "no trajectories": TrajectoryGroup(group_id="g", trajectories=[]),
    "no tokens": group(tokens=[], action_mask=[], sampling_logprobs=[], policy_versions=[]),
    "action_mask length": group(action_mask=[0, 1, 1]),
    "logprobs length": group(sampling_logprobs=[0.0, -1.0]),
    "versions length": group(policy_versions=[-1, 0, 0, 0, 0]),
    "mask not 0/1": group(action_mask=[0, 0, 2, 1]),
    "no action tokens": group(action_mask=[0, 0, 0, 0]),
    "action token without version": group(policy_versions=[-1, -1, -1, 0]),
    "nan reward": group(rewards=(math.nan, 1.0)),
    "inf advantage": group(advantage=math.inf),
    "nan logprob": group(sampling_logprobs=[0.0, 0.0, math.nan, -1.0]),
    "positive logprob": group(sampling_logprobs=[0.0, 0.0, 0.5, -1.0]),
    "token >= vocab": group(tokens=[5, 6, VOCAB, 8]),
    "negative token": group(tokens=[-1, 6, 7, 8]),
    "float token (schema)": group(tokens=[5, 6, 7.5, 8]),
    "numpy token (schema)": group(tokens=[np.int64(5), 6, 7, 8]),
    "string reward (schema)": group(rewards=("high", 1.0)),
}


@pytest.mark.parametrize("case", BAD_GROUPS)
def test_validate_rejects(case):
    assert validate(BAD_GROUPS[case], VOCAB) is not None


def test_validate_accepts_good_group():
    assert validate(group(), VOCAB) is None


def test_intake_counts_every_group(new_buffer):
    buf = new_buffer(drop_no_signal=True)
    assert buf.add(group("ok")) is None
    assert buf.add(TrajectoryGroup(group_id="f", trajectories=[], failed=True, error="boom")) == "env_error"
    assert buf.add(BAD_GROUPS["nan reward"]) == "invalid"
    assert buf.add(group("flat", rewards=(1.0, 1.0))) == "no_signal"
    buf.drop("malformed")
    stats = buf.stats()
    assert stats["received"] == 5 and stats["accepted"] == 1 and stats["last_seq"] == 1
    assert stats["dropped"] == {"env_error": 1, "invalid": 1, "no_signal": 1, "malformed": 1}
    check_accounting(stats)
    assert new_buffer().add(group("flat", rewards=(1.0, 1.0))) is None  # flag off: kept


# --------------------------------------------------------------------------- serving and the log


def test_batches_in_log_order_and_idempotent(new_buffer):
    buf = new_buffer()
    for i in range(5):
        buf.add(group(f"g{i}"))
    first = buf.batch(request(0, max_groups=2))
    assert first.seqs == [1, 2] and [g.group_id for g in first.groups] == ["g0", "g1"]
    assert buf.batch(request(0, max_groups=2)) == first  # asking again: the same groups
    assert buf.batch(request(2, max_groups=2)).seqs == [3, 4]
    assert buf.stats()["acked_seq"] == 2 and buf.stats()["in_memory"] == 3  # 1, 2 released
    assert buf.batch(request(5)).seqs == []


def test_restart_replays_log_and_serves_unacknowledged(new_buffer):
    buf = new_buffer()
    for i in range(5):
        buf.add(group(f"g{i}"))
    buf.add(BAD_GROUPS["nan reward"])
    buf.batch(request(2, max_groups=2))  # trained 1..2, got 3..4
    before = buf.stats()
    # No close(): as if the process was killed. Every record is already in the OS.
    again = new_buffer()
    assert again.stats() == before
    assert again.batch(request(2)).seqs == [3, 4, 5]
    # A learner resuming from an older checkpoint gets the released groups back from disk.
    resumed = again.batch(request(0, max_groups=3))
    assert resumed.seqs == [1, 2, 3] and resumed.groups[0] == group("g0")
    again.add(group("g5"))
    assert again.batch(request(4)).seqs == [5, 6]
    check_accounting(again.stats())


def test_truncated_tail_is_cut_counted_and_kept_aside(new_buffer, tmp_path):
    buf = new_buffer()
    for i in range(3):
        buf.add(group(f"g{i}"))
    buf.close()
    path = tmp_path / "log" / LOG_NAME
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 7)  # the last record was being written when the process died
    again = new_buffer()
    stats = again.stats()
    assert stats["log_truncated"] == 1 and stats["last_seq"] == 2 and stats["accepted"] == 2
    assert list((tmp_path / "log").glob(f"{LOG_NAME}.corrupt-*"))
    again.add(group("g3"))  # the log stays appendable after the cut
    assert again.batch(request(0)).seqs == [1, 2, 3]
    again.close()
    with open(path, "ab") as f:
        f.write(b"\x05\x00")  # a torn header
    third = new_buffer()
    assert third.stats()["log_truncated"] == 1 and third.stats()["last_seq"] == 3


def test_torn_header_claiming_huge_length_is_a_torn_tail(new_buffer, tmp_path):
    new_buffer().add(group())
    with open(tmp_path / "log" / LOG_NAME, "ab") as f:
        f.write(b"\xff\xff\xff\x7f\x00\x00\x00\x00abc")
    assert new_buffer().stats()["log_truncated"] == 1


def test_staleness_drops_counted_once_and_never_served(new_buffer):
    buf = new_buffer(max_staleness=1)
    buf.add(group("v0", version=0))
    buf.add(group("v1", version=1))
    mixed = group("mixed", version=2)
    mixed.trajectories[0].policy_versions = [-1, -1, 0, 2]  # its oldest action token is v0
    buf.add(mixed)
    batch = buf.batch(request(0, learner_version=2))
    assert batch.seqs == [2] and batch.dropped == {"stale": 2}
    assert buf.batch(request(0, learner_version=2)) == batch  # re-request: not counted twice
    assert buf.batch(request(0, learner_version=1)).seqs == [2]  # a stale group stays dropped
    assert buf.batch(request(0, learner_version=3)).dropped == {"stale": 3}
    check_accounting(buf.stats())
    again = new_buffer(max_staleness=1)  # persisted: still dropped, still counted once
    assert again.batch(request(0, learner_version=0)).seqs == []
    assert again.stats()["dropped"] == {"stale": 3}


def test_accounting_identity_holds_throughout(new_buffer):
    rng = np.random.default_rng(0)
    buf = new_buffer(max_staleness=2, drop_no_signal=True)
    after, version = 0, 0
    for step in range(60):
        kind = rng.integers(5)
        if kind == 0:
            buf.add(TrajectoryGroup(group_id="f", trajectories=[], failed=True))
        elif kind == 1:
            buf.add(BAD_GROUPS["positive logprob"])
        elif kind == 2:
            buf.add(group(rewards=(1.0, 1.0)))
        else:
            buf.add(group(version=int(rng.integers(max(0, version - 4), version + 1))))
        if step % 7 == 0:
            version += 1
            batch = buf.batch(request(after, learner_version=version, max_groups=3))
            after = batch.seqs[-1] if batch.seqs else after
        check_accounting(buf.stats())
    check_accounting(new_buffer(max_staleness=2).stats())


# --------------------------------------------------------------------------- the served role


def _start_serve(tmp_path, exp_addr, batch_addr, **kwargs):
    stop, ready, result = threading.Event(), threading.Event(), {}
    kwargs.setdefault("max_staleness", 1)

    def run():
        result["stats"] = serve(tmp_path / "log", exp_addr, batch_addr, vocab_size=VOCAB,
                                stop=stop, ready=ready, **kwargs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    return stop, thread, result


def test_serve_end_to_end_every_group_accounted(tmp_path):
    exp_addr, batch_addr = tcp_address(), tcp_address()
    stop, thread, result = _start_serve(tmp_path, exp_addr, batch_addr)
    good = {f"e{e}-{i}" for e in range(2) for i in range(10)}
    explorers = [Sender(exp_addr) for _ in range(2)]
    for i in range(10):
        for e, tx in enumerate(explorers):
            tx.send(group(f"e{e}-{i}", version=5), timeout_s=5)
    explorers[0].send(group("stale", version=0), timeout_s=5)
    explorers[0].send(BAD_GROUPS["token >= vocab"], timeout_s=5)
    explorers[1].send(BAD_GROUPS["nan logprob"], timeout_s=5)
    explorers[1].send(TrajectoryGroup(group_id="crashed", trajectories=[], failed=True, error="x"), timeout_s=5)
    explorers[1].send(Heartbeat(sender="confused", time=0.0), timeout_s=5)  # not experience
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(exp_addr)
    raw.send(b"\xc1 not msgpack")
    raw.send(msgspec.msgpack.encode({"type": "group", "group_id": 1}))
    pushed = 20 + 4 + 1 + 2

    with RequestClient(batch_addr) as learner:
        deadline = time.monotonic() + 10
        seqs, ids, after = [], [], 0
        while time.monotonic() < deadline:
            batch = learner.request(request(after, learner_version=5, max_groups=4), timeout_s=1.0)
            if batch is None:
                continue
            seqs += batch.seqs
            ids += [g.group_id for g in batch.groups]
            after = batch.seqs[-1] if batch.seqs else after
            if sum(batch.dropped.values()) == 7 and not batch.seqs:  # all pushed are accounted
                break
            time.sleep(0.01)
        assert learner.request(Shutdown(reason="done"), timeout_s=5) == Shutdown(reason="buffer stopped")
    thread.join(10)
    raw.close(linger=0)
    for tx in explorers:
        tx.close()

    stats = result["stats"]
    assert set(ids) == good and len(ids) == len(good)  # each good group trained exactly once
    assert seqs == sorted(seqs)
    assert stats["received"] == pushed
    assert stats["accepted"] == 21
    assert stats["dropped"] == {"stale": 1, "invalid": 2, "env_error": 1, "unexpected": 1, "malformed": 2}
    check_accounting(stats)


# The role needs only rlpipe.types/transport/buffer. rlpipe/__init__.py imports torch (seconds
# per start), so the child registers a bare package object instead of running it.
BUFFER_PROCESS = """
import sys, types
package = types.ModuleType("rlpipe")
package.__path__ = [sys.argv[4]]
sys.modules["rlpipe"] = package
from rlpipe.pipeline.buffer import serve
serve(sys.argv[1], sys.argv[2], sys.argv[3], vocab_size=100, max_staleness=4)
"""


def test_killed_buffer_process_loses_nothing(tmp_path):
    exp_addr, batch_addr = tcp_address(), tcp_address()
    log_dir = str(tmp_path / "log")

    def start():
        package_dir = os.path.dirname(rlpipe.pipeline.buffer.__file__)
        return subprocess.Popen([sys.executable, "-c", BUFFER_PROCESS, log_dir, exp_addr, batch_addr, package_dir])

    proc = start()
    try:
        with Sender(exp_addr) as tx, RequestClient(batch_addr) as learner:
            for i in range(6):
                tx.send(group(f"g{i}"), timeout_s=10)
            # Served means logged: once all six came back they are in the buffer's log.
            served = _pull_until(learner, after=0, want=6)
            proc.kill()  # SIGKILL: no close(), no final fsync
            proc.wait(10)
            proc = start()
            for i in range(6, 8):
                tx.send(group(f"g{i}"), timeout_s=10)  # PUSH reconnects by itself
            # The learner had trained only 1..2 when it checkpointed; it resumes from there.
            resumed = _pull_until(learner, after=2, want=6)
        assert [g.group_id for g in served[:2] + resumed] == [f"g{i}" for i in range(8)]
    finally:
        proc.kill()
        proc.wait(10)


def _pull_until(learner, after, want, timeout_s=30.0):
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        batch = learner.request(request(after, max_groups=want - len(got)), timeout_s=1.0)
        if batch is not None and batch.seqs:
            got += batch.groups
            after = batch.seqs[-1]
        else:
            time.sleep(0.05)
    assert len(got) == want
    return got
