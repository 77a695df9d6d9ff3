"""The experience buffer: validation, deduplication, the store, staleness, compaction, idempotent
serving, and the served role over real sockets (and a real process that is SIGKILLed)."""

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import msgspec
import numpy as np
import pytest
import zmq

import rlpipe.pipeline.buffer
from rlpipe.pipeline.buffer import ExperienceBuffer, read_groups, read_stats, seen_group_ids, serve, validate
from rlpipe.pipeline.store import StoreInUse, store_bytes
from rlpipe.pipeline.transport import RequestClient, tcp_address
from rlpipe.pipeline.validation import checked_decoder
from rlpipe.types import BatchRequest, GroupAck, Heartbeat, Shutdown, Trajectory, TrajectoryGroup

VOCAB = 100


def traj(version=0, reward=1.0, **changes):
    """Two observation tokens then two action tokens sampled by `version`."""
    fields = dict(tokens=[5, 6, 7, 8], action_mask=[0, 0, 1, 1], sampling_logprobs=[0.0, 0.0, -0.1, -2.0],
                  policy_versions=[-1, -1, version, version], reward=reward, advantage=0.0)
    fields.update(changes)
    return Trajectory(**fields)


def group(gid="g", version=0, rewards=(1.0, 0.0), run_id="", incarnation=0, **changes):
    return TrajectoryGroup(group_id=gid, trajectories=[traj(version, r, **changes) for r in rewards],
                           run_id=run_id, incarnation=incarnation)


def request(after_seq, learner_version=0, max_groups=100, **fields):
    return BatchRequest(sender="learner", learner_version=learner_version, after_seq=after_seq,
                        max_groups=max_groups, **fields)


def check_accounting(stats):
    dropped = stats["dropped"]
    assert stats["received"] == stats["accepted"] + sum(n for r, n in dropped.items() if r != "stale")
    assert dropped.get("stale", 0) == sum(stats["stale_reasons"].values()) <= stats["accepted"]


@pytest.fixture
def new_buffer(tmp_path):
    """new_buffer(**kwargs) opens the buffer at tmp_path/buffer, closing the previous one (one
    writer per store): a restart. Everything is committed, so closing hides nothing."""
    made = []

    def make(**kwargs):
        kwargs.setdefault("vocab_size", VOCAB)
        for buf in made:
            buf.close()
        made[:] = [ExperienceBuffer(tmp_path / "buffer", **kwargs)]
        return made[0]

    yield make
    for buf in made:
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
    "version beyond int64": group(policy_versions=[-1, -1, 0, 1 << 63]),
    "nan reward": group(rewards=(math.nan, 1.0)),
    "inf advantage": group(advantage=math.inf),
    "nan logprob": group(sampling_logprobs=[0.0, 0.0, math.nan, -1.0]),
    "-inf logprob": group(sampling_logprobs=[0.0, 0.0, -math.inf, -1.0]),
    "positive logprob": group(sampling_logprobs=[0.0, 0.0, 0.5, -1.0]),
    "token >= vocab": group(tokens=[5, 6, VOCAB, 8]),
    "negative token": group(tokens=[-1, 6, 7, 8]),
    "float token (schema)": group(tokens=[5, 6, 7.5, 8]),
    "numpy token (schema)": group(tokens=[np.int64(5), 6, 7, 8]),
    "string reward (schema)": group(rewards=("high", 1.0)),
    "negative incarnation": group(incarnation=-1),
}


@pytest.mark.parametrize("case", BAD_GROUPS)
def test_validate_rejects(case):
    assert validate(BAD_GROUPS[case], VOCAB) is not None


def test_validate_accepts_good_group_and_explains_bad_values():
    assert validate(group(), VOCAB) is None
    assert validate(BAD_GROUPS["token >= vocab"], VOCAB).startswith(f"token id outside [0, {VOCAB})")
    assert validate(BAD_GROUPS["nan logprob"], VOCAB).startswith("sampling_logprobs must be finite and <= 0")
    assert "trajectory 0: action_mask has 3 entries for 4 tokens" == validate(BAD_GROUPS["action_mask length"], VOCAB)


def test_checked_decoder_keeps_every_field():
    """The checked structs are made from TrajectoryGroup/Trajectory: what they decode encodes
    back to the same bytes, optional fields included."""
    full = TrajectoryGroup(group_id="g", trajectories=[traj(3, stop_reason="stop", metrics={"len": 4.0})],
                           explorer_id="e", created_at=1.5, explorer_stats={"busy": 0.5}, run_id="r", incarnation=2)
    data = msgspec.msgpack.encode(full)
    assert msgspec.msgpack.encode(checked_decoder(VOCAB).decode(data)) == data
    untagged = msgspec.msgpack.encode(msgspec.structs.asdict(full) | {"trajectories": []})
    with pytest.raises(msgspec.ValidationError):  # a map without the "group" tag is no group
        checked_decoder(VOCAB).decode(untagged)


# --------------------------------------------------------------------------- intake and deduplication


def test_intake_outcomes_and_counters(new_buffer):
    buf = new_buffer(drop_no_signal=True)
    assert buf.add(group("ok")) == "accepted"
    assert buf.add(TrajectoryGroup(group_id="f", trajectories=[], failed=True, error="boom")) == "env_error"
    assert buf.add(group("bad", rewards=(math.nan, 1.0))) == "invalid"
    assert buf.add(group("flat", rewards=(1.0, 1.0))) == "no_signal"
    assert buf.add(group("ok", rewards=(0.5, 0.0))) == "duplicate"  # other bytes, same id
    buf.reject("not_msgpack")
    stats = buf.stats()
    assert (stats["received"], stats["accepted"], stats["duplicates"], stats["last_seq"]) == (4, 1, 1, 1)
    assert stats["dropped"] == {"env_error": 1, "invalid": 1, "no_signal": 1}
    assert stats["rejected"] == {"not_msgpack": 1}
    check_accounting(stats)
    assert new_buffer().add(group("flat2", rewards=(1.0, 1.0))) == "accepted"  # flag off: kept


def test_dedup_by_id_survives_restart_and_compaction(new_buffer):
    buf = new_buffer()
    assert buf.add_many([group("a"), group("b", tokens=[5, 6, 7, VOCAB]), group("c")]) == \
        ["accepted", "invalid", "accepted"]
    buf.batch(request(2, durable_seq=2))  # the learner's checkpoint covers a and c: compacted
    assert buf.stats()["in_store"] == 0
    again = new_buffer()
    # A fixed re-send of the invalid group and re-sends of compacted ones: the first decision stands.
    assert again.add_many([group("a"), group("b"), group("c", version=3)]) == ["duplicate"] * 3
    stats = again.stats()
    assert (stats["received"], stats["accepted"], stats["duplicates"], stats["in_store"]) == (3, 2, 3, 0)
    assert seen_group_ids(again.store.dir, ["a", "b", "zz"]) == {"a", "b"}
    check_accounting(stats)


def test_groups_without_a_usable_id_are_invalid_every_time(new_buffer):
    buf = new_buffer()
    assert buf.add(group("")) == "invalid"
    assert buf.add(group("")) == "invalid"  # no key to deduplicate on: counted again, not "duplicate"
    assert buf.add(group("x" * 257)) == "invalid"
    assert buf.stats()["dropped"] == {"invalid": 3} and buf.stats()["duplicates"] == 0


def test_other_run_and_replaced_incarnation_dropped_at_intake(new_buffer):
    buf = new_buffer(run_id="run-a")
    assert buf.add(group("other", run_id="run-b", incarnation=1)) == "other_run"
    assert buf.add(group("unnamed")) == "accepted"  # no run id on the group: not checked
    assert buf.add(group("i1", run_id="run-a", incarnation=1)) == "accepted"
    buf.batch(request(0, run_id="run-a", incarnation=2))  # learner incarnation 2 is alive now
    assert buf.add(group("late", run_id="run-a", incarnation=1)) == "other_incarnation"
    again = new_buffer(run_id="run-a")  # the incarnation is persisted
    assert again.stats()["learner_incarnation"] == 2
    assert again.add(group("late2", run_id="run-a", incarnation=1)) == "other_incarnation"
    assert again.add(group("i2", run_id="run-a", incarnation=2)) == "accepted"
    assert again.stats()["dropped"] == {"other_run": 1, "other_incarnation": 2, "stale": 2}  # unnamed, i1
    check_accounting(again.stats())


def test_store_belongs_to_one_run_and_one_writer(new_buffer, tmp_path):
    buf = new_buffer(run_id="run-a")
    with pytest.raises(StoreInUse):
        ExperienceBuffer(tmp_path / "buffer", vocab_size=VOCAB)
    buf.close()
    with pytest.raises(ValueError, match="run-a"):
        ExperienceBuffer(tmp_path / "buffer", vocab_size=VOCAB, run_id="run-b")
    assert new_buffer().run_id == "run-a"  # opened without a run id: it keeps its own


def test_failed_transaction_changes_no_counter(new_buffer):
    buf = new_buffer()
    buf.add(group("a"))
    before = buf.stats()
    good, broken = (buf._examined(group(gid), None, msgspec.msgpack.encode(group(gid))) for gid in ("b", "c"))
    broken.body = None  # violates NOT NULL in the middle of the transaction
    with pytest.raises(sqlite3.IntegrityError):
        buf.decide([good, broken])
    assert buf.stats() == before and read_stats(buf.store.dir) == before
    assert buf.add(group("b")) == "accepted"  # "b" was rolled back with the rest, not half-decided


# --------------------------------------------------------------------------- serving


def test_batches_in_seq_order_and_idempotent(new_buffer):
    buf = new_buffer()
    buf.add_many([group(f"g{i}") for i in range(5)])
    first = buf.batch(request(0, max_groups=2))
    assert first.seqs == [1, 2] and [g.group_id for g in first.groups] == ["g0", "g1"]
    assert buf.batch(request(0, max_groups=2)) == first  # asking again: the same groups
    assert buf.batch(request(2, max_groups=2)).seqs == [3, 4]
    assert buf.batch(request(5)).seqs == []
    again = new_buffer()  # restart: the same answers from the store
    assert again.batch(request(1, max_groups=3)).seqs == [2, 3, 4]


def test_serve_time_drops_counted_once_by_reason(new_buffer):
    buf = new_buffer(max_staleness=1)
    buf.add_many([group("old", version=0, incarnation=1), group("ok", version=1, incarnation=1),
                  group("future", version=5, incarnation=1), group("dead", version=2, incarnation=1)])
    mixed = group("mixed", version=2, incarnation=1)
    mixed.trajectories[0].policy_versions = [-1, -1, 0, 0]  # action versions 0, 0, 2, 2: mean lag 1 (u = 2)
    buf.add(mixed)
    too_mixed = group("too_mixed", version=0, incarnation=1)
    too_mixed.trajectories[0].policy_versions = [-1, -1, 0, 2]  # 0, 2, 0, 0: mean lag 1.5 > 1
    leaky = group("leaky", version=1, incarnation=1)
    leaky.trajectories[0].policy_versions = [-1, -1, 0, 3]  # mean 1 fresh enough, but a token from v3
    buf.add_many([too_mixed, leaky])
    batch = buf.batch(request(0, learner_version=2, incarnation=1))
    # Per-token staleness: "mixed" has an action token of v0 (lag 2 > 1) and is trained all the same.
    assert [g.group_id for g in batch.groups] == ["ok", "dead", "mixed"] and batch.seqs == [2, 4, 5]
    assert batch.dropped == {"stale": 4}  # old and too_mixed too old, future and leaky newer than the learner
    assert buf.batch(request(0, learner_version=2, incarnation=1)) == batch  # re-request: not counted twice
    # Learner incarnation 2 (a restart from a checkpoint) never trains incarnation 1's groups.
    again = buf.batch(request(0, learner_version=2, incarnation=2))
    assert again.groups == [] and again.dropped == {"stale": 7}
    stats = new_buffer(max_staleness=1).stats()  # persisted
    assert stats["stale_reasons"] == {"too_old": 2, "future_version": 2, "other_incarnation": 3}
    assert stats["dropped"] == {"stale": 7} and stats["in_store"] == 0
    check_accounting(stats)


def test_a_replaced_learner_drops_nothing_of_its_successor(new_buffer):
    # A zombie learner (say on a host cut off from the launcher) asks after its successor has
    # started: it is refused once the buffer knows the successor, and before that, it stops at
    # the successor's groups instead of dropping them as "other_incarnation".
    buf = new_buffer(max_staleness=1)
    buf.add_many([group("mine", version=1, incarnation=1), group("successor", version=1, incarnation=2)])
    batch = buf.batch(request(0, learner_version=1, incarnation=1))
    assert batch.seqs == [1] and batch.dropped == {}
    assert buf.batch(request(1, learner_version=1, incarnation=1)).seqs == []
    assert [g.group_id for g in buf.batch(request(1, learner_version=1, incarnation=2)).groups] == ["successor"]
    assert buf.refusal(request(0, incarnation=1)) == "old_incarnation"


def test_requests_of_other_runs_and_replaced_learners_are_refused(new_buffer):
    buf = new_buffer(run_id="run-a")
    buf.add(group("g", incarnation=2))
    assert buf.refusal(request(0, run_id="run-b")) == "other_run"
    assert buf.refusal(request(0)) == "other_run"  # a request must name the buffer's run
    assert buf.batch(request(0, run_id="run-a", incarnation=2)).seqs == [1]
    assert buf.refusal(request(0, run_id="run-a", incarnation=1)) == "old_incarnation"
    with pytest.raises(ValueError, match="old_incarnation"):
        buf.batch(request(0, run_id="run-a", incarnation=1))  # a zombie learner drops nothing
    assert buf.batch(request(0, run_id="run-a", incarnation=2)).seqs == [1]


def test_compaction_deletes_payloads_and_keeps_counters(new_buffer):
    buf = new_buffer()
    buf.add_many([group(f"g{i}") for i in range(6)])
    buf.batch(request(4, durable_seq=3))
    assert buf.stats()["durable_seq"] == 3 and buf.stats()["in_store"] == 3
    assert [g.group_id for g in read_groups(buf.store.dir)] == ["g3", "g4", "g5"]
    assert buf.batch(request(3)).seqs == [4, 5, 6]  # everything above durable_seq is still served
    buf.batch(request(6, durable_seq=10**6))  # beyond last_seq: only what exists goes
    assert buf.stats()["durable_seq"] == 6
    buf.add(group("g6"))
    assert buf.batch(request(6)).seqs == [7]  # the next group is not compacted in advance
    stats = buf.stats()
    assert (stats["received"], stats["accepted"], stats["in_store"]) == (7, 7, 1)


@pytest.mark.slow
def test_store_stays_bounded_while_groups_flow(new_buffer):
    """Thousands of 4k-token groups pass with the learner's durable_seq following: the store
    (database + WAL) stops growing once compaction and WAL checkpoints run."""
    traj = Trajectory(tokens=list(range(50, 50 + 256)) * 16, action_mask=[1] * 4096,
                      sampling_logprobs=[-0.5] * 4096, policy_versions=[0] * 4096, reward=1.0)
    buf = new_buffer(vocab_size=32000)
    encoded = msgspec.msgpack.encode(TrajectoryGroup(group_id="", trajectories=[traj, traj]))
    after, sizes = 0, []
    for step in range(60):  # 60 x 50 groups of ~70 KB: ~210 MB through the buffer
        items = [buf._examined(*_checked(encoded, f"s{step}-{i}")) for i in range(50)]
        assert set(buf.decide(items)) == {"accepted"}
        # The learner trains 50 groups per step and checkpoints every other step.
        batch = buf.batch(request(after, max_groups=50, durable_seq=after if step % 2 else 0))
        after = batch.seqs[-1]
        sizes.append(store_bytes(buf.store.dir))
    assert buf.stats()["accepted"] == 3000 and buf.stats()["in_store"] <= 100
    assert max(sizes[20:]) < 40e6, sizes  # vs 210 MB written
    assert max(sizes[40:]) <= 1.05 * max(sizes[20:40]), sizes  # no growth after warm-up


def _checked(encoded: bytes, gid: str):
    data = msgspec.msgpack.encode(msgspec.structs.replace(msgspec.msgpack.decode(encoded, type=TrajectoryGroup),
                                                          group_id=gid))
    return checked_decoder(32000).decode(data), None, data


def test_accounting_identity_holds_throughout(new_buffer):
    rng = np.random.default_rng(0)
    buf = new_buffer(max_staleness=2, drop_no_signal=True)
    after, version, ids = 0, 0, []
    for step in range(80):
        kind = rng.integers(6)
        gid = f"g{step}"
        if kind == 0:
            buf.add(TrajectoryGroup(group_id=gid, trajectories=[], failed=True))
        elif kind == 1:
            buf.add(group(gid, sampling_logprobs=[0.0, 0.0, 0.5, -1.0]))
        elif kind == 2:
            buf.add(group(gid, rewards=(1.0, 1.0)))
        elif kind == 3 and ids:
            assert buf.add(group(str(rng.choice(ids)))) == "duplicate"
            gid = None
        else:
            buf.add(group(gid, version=int(rng.integers(max(0, version - 4), version + 2))))
        if gid is not None:
            ids.append(gid)
        if step % 7 == 0:
            version += 1
            batch = buf.batch(request(after, learner_version=version, max_groups=3, durable_seq=after))
            after = batch.seqs[-1] if batch.seqs else after
        if step % 20 == 0:
            buf = new_buffer(max_staleness=2, drop_no_signal=True)  # restarts change nothing
        check_accounting(buf.stats())
    assert buf.stats()["duplicates"] > 0 and buf.stats()["dropped"].get("stale", 0) > 0
    assert read_stats(buf.store.dir) == buf.stats()


def test_read_stats_does_not_disturb_a_writing_buffer(new_buffer, tmp_path):
    assert read_stats(tmp_path / "nothing")["received"] == 0
    buf = new_buffer()
    buf.add(group("a"))
    reader = sqlite3.connect(f"file:{tmp_path / 'buffer' / 'buffer.db'}?mode=ro", uri=True)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM payloads").fetchone() == (1,)  # a reader holds a snapshot...
    assert buf.add(group("b")) == "accepted"  # ...and the writer goes on
    reader.execute("COMMIT")
    reader.close()
    assert read_stats(buf.store.dir)["accepted"] == 2 == buf.stats()["accepted"]


# --------------------------------------------------------------------------- the served role


def _start_serve(tmp_path, exp_addr, batch_addr, **kwargs):
    stop, ready, result = threading.Event(), threading.Event(), {}
    kwargs.setdefault("max_staleness", 1)

    def run():
        result["stats"] = serve(tmp_path / "buffer", exp_addr, batch_addr, vocab_size=VOCAB,
                                stop=stop, ready=ready, **kwargs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    return stop, thread, result


def test_serve_acknowledges_every_group_and_accounts_for_every_frame(tmp_path):
    exp_addr, batch_addr = tcp_address(), tcp_address()
    _, thread, result = _start_serve(tmp_path, exp_addr, batch_addr, run_id="run-a")
    explorers = [RequestClient(exp_addr) for _ in range(2)]
    good = {f"e{e}-{i}" for e in range(2) for i in range(10)}
    for i in range(10):
        for e, client in enumerate(explorers):
            assert client.request(group(f"e{e}-{i}", version=5, run_id="run-a"), 5) == \
                GroupAck(group_id=f"e{e}-{i}", outcome="accepted")
            # Acknowledged means committed: another connection sees the decision at once.
            assert seen_group_ids(tmp_path / "buffer", [f"e{e}-{i}"]) == {f"e{e}-{i}"}
    sent = {"stale": group("stale", version=0), "bad": BAD_GROUPS["token >= vocab"],
            "crashed": TrajectoryGroup(group_id="crashed", trajectories=[], failed=True, error="x"),
            "foreign": group("foreign", run_id="run-b")}
    outcomes = {k: explorers[0].request(msgspec.structs.replace(g, group_id=k), 5).outcome for k, g in sent.items()}
    assert outcomes == {"stale": "accepted", "bad": "invalid", "crashed": "env_error", "foreign": "other_run"}
    assert explorers[1].request(group("e0-3", version=5), 5) == GroupAck(group_id="e0-3", outcome="duplicate")
    # Frames that are no group get no answer and are counted as rejected, by reason.
    assert explorers[1].request(Heartbeat(sender="confused", time=0.0), 0.5) is None
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(exp_addr)
    raw.send_multipart([b"1", b"\xc1 not msgpack"])
    raw.send_multipart([b"2", msgspec.msgpack.encode({"type": "group", "group_id": 1})])
    raw.send(b"one frame only")

    with RequestClient(batch_addr) as learner:
        ids, after = [], 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until every accepted group was served or dropped stale
            batch = learner.request(request(after, learner_version=5, max_groups=4, run_id="run-a"), timeout_s=1.0)
            if batch is not None:
                ids += [g.group_id for g in batch.groups]
                after = batch.seqs[-1] if batch.seqs else after
                if not batch.seqs and batch.dropped.get("stale") == 1:
                    break
        refused = learner.request(request(0, run_id="run-b"), timeout_s=5.0)  # refused, counted, told why
        assert isinstance(refused, Shutdown) and refused.reason.startswith("refused: other_run")
        # Only this run's learner may stop the buffer: another run's Shutdown is counted, not obeyed.
        assert learner.request(Shutdown(reason="stop", run_id="run-b"), timeout_s=0.5) is None
        assert learner.request(Shutdown(reason="done", run_id="run-a"), timeout_s=5) == Shutdown(reason="buffer stopped")
    thread.join(10)
    raw.close(linger=0)
    for client in explorers:
        client.close()

    stats = result["stats"]
    assert sorted(ids) == sorted(good)  # each good group served exactly once, in seq order
    assert (stats["received"], stats["accepted"], stats["duplicates"]) == (24, 21, 1)
    assert stats["dropped"] == {"invalid": 1, "env_error": 1, "other_run": 1, "stale": 1}
    assert stats["rejected"] == {"unexpected": 1, "not_msgpack": 1, "schema": 1, "framing": 1, "other_run": 2}
    check_accounting(stats)
    assert read_stats(tmp_path / "buffer") | {"store_bytes": 0} == stats | {"store_bytes": 0}


# The role needs only rlpipe.types/transport/store/buffer: a bare package object avoids
# running rlpipe/__init__.py (kept cheap, but the child needs nothing of it).
BUFFER_PROCESS = """
import sys, types
package = types.ModuleType("rlpipe")
package.__path__ = [sys.argv[4]]
sys.modules["rlpipe"] = package
from rlpipe.pipeline.buffer import serve
serve(sys.argv[1], sys.argv[2], sys.argv[3], vocab_size=100, max_staleness=4)
"""


def test_killed_buffer_process_loses_nothing_it_acknowledged(tmp_path):
    exp_addr, batch_addr = tcp_address(), tcp_address()
    buffer_dir = str(tmp_path / "buffer")

    def start():
        package_dir = os.path.dirname(os.path.dirname(rlpipe.pipeline.buffer.__file__))
        return subprocess.Popen([sys.executable, "-c", BUFFER_PROCESS, buffer_dir, exp_addr, batch_addr, package_dir])

    proc = start()
    try:
        with RequestClient(exp_addr) as explorer, RequestClient(batch_addr) as learner:
            for i in range(6):
                assert _until_acked(explorer, group(f"g{i}")) == "accepted"
            proc.kill()  # SIGKILL right after the last ack: no close(), no final commit
            proc.wait(10)
            proc = start()
            # The ack of g5 is "lost": the explorer sends it again and the new process knows it.
            assert _until_acked(explorer, group("g5")) == "duplicate"
            for i in range(6, 8):
                assert _until_acked(explorer, group(f"g{i}")) == "accepted"
            served = _pull_until(learner, after=0, want=8)
        assert [g.group_id for g in served] == [f"g{i}" for i in range(8)]
    finally:
        proc.kill()
        proc.wait(10)


def _until_acked(client, g, timeout_s=30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # a buffer starting up costs retries, as for the explorer
        if (ack := client.request(g, timeout_s=1.0)) is not None:
            assert ack.group_id == g.group_id
            return ack.outcome
    raise AssertionError(f"{g.group_id} not acknowledged within {timeout_s} s")


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


def test_cli_buffer_writes_its_stats_while_running_and_on_sigterm(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    exp_addr, batch_addr = tcp_address(), tcp_address()
    config = tmp_path / "run.toml"
    config.write_text(f'name = "r"\nruns_dir = "{tmp_path}"\nbase_model = "{model}"\n[addresses]\n'
                      f'experience = "{exp_addr}"\nbatches = "{batch_addr}"\n')
    stats_file = tmp_path / "r" / "buffer_stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "rlpipe.cli", "buffer", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with RequestClient(exp_addr) as explorer:
            assert _until_acked(explorer, group("a")) == "accepted"
            assert _until_acked(explorer, group("b", tokens=[1, 2, 3, VOCAB])) == "invalid"
            deadline = time.monotonic() + 10  # written every second while it runs
            while time.monotonic() < deadline and (not stats_file.exists() or
                                                   json.loads(stats_file.read_text())["received"] < 2):
                time.sleep(0.1)
            assert json.loads(stats_file.read_text())["received"] == 2
            assert _until_acked(explorer, group("c")) == "accepted"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    stats = json.loads(stats_file.read_text())
    assert (stats["received"], stats["accepted"], stats["dropped"]) == (3, 2, {"invalid": 1}), err.decode()[-2000:]
    assert stats["run_id"] == json.loads((tmp_path / "r" / "run.json").read_text())["run_id"]
    assert not list(stats_file.parent.glob(".buffer_stats.json*"))  # written atomically, nothing left over


def test_dedup_memory_is_bounded_per_explorer(new_buffer):
    import sqlite3

    from rlpipe.pipeline import store

    keep = 8
    original = store.DEDUP_PER_EXPLORER
    store.Store.forget_decisions.__defaults__ = (keep,)
    try:
        buf = new_buffer()
        quiet = group("quiet-0", incarnation=1)
        quiet.explorer_id = "quiet"
        buf.add(quiet)
        for i in range(40):  # a busy explorer decides many groups meanwhile
            g = group(f"busy-{i}", incarnation=1)
            g.explorer_id = "busy"
            buf.add(g)
        with sqlite3.connect(buf.store.path) as db:
            rows = dict(db.execute("SELECT explorer, COUNT(*) FROM decisions GROUP BY explorer").fetchall())
        assert rows == {"busy": keep, "quiet": 1}  # bounded, and the quiet explorer keeps its own
        assert buf.add(quiet) == "duplicate"  # still known after 40 others
        recent = group("busy-39", incarnation=1)
        recent.explorer_id = "busy"
        assert buf.add(recent) == "duplicate"
    finally:
        store.Store.forget_decisions.__defaults__ = (original,)
