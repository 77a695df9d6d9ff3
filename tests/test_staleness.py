"""Per-token staleness (docs/pipeline.md, "Staleness") and bounded no-signal hunting (DAPO's
dynamic sampling): the rule, the store that keeps it, the admission budget, the learner's
figures, the fetcher's bound, the console's warning. Quick tier; the buffer and the fetcher
run over real sockets, the buffer's answers to the fetcher come from a scripted fake that
says so."""

from __future__ import annotations

import random
import sqlite3
import threading
from fractions import Fraction

import msgspec
import pytest

from rlpipe.cli.console import no_signal_warning
from rlpipe.datums import batch_metrics
from rlpipe.pipeline.admission import Admission, CreditLine
from rlpipe.pipeline.buffer import ExperienceBuffer, is_stale
from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.pipeline.fetch import BatchFetcher
from rlpipe.pipeline.stats import lag_figures
from rlpipe.pipeline.store import DB_NAME
from rlpipe.pipeline.transport import RequestServer, tcp_address
from rlpipe.pipeline.validation import Versions, group_versions
from rlpipe.types import Batch, BatchRequest, CreditRequest, Trajectory, TrajectoryGroup
from tests.test_knobs import learner_config

VOCAB = 100


def traj(versions, reward=1.0) -> Trajectory:
    """One observation token, then one action token per entry of versions."""
    n = len(versions)
    return Trajectory(tokens=[5] * (n + 1), action_mask=[0] + [1] * n, sampling_logprobs=[0.0] + [-0.5] * n,
                      policy_versions=[-1, *versions], reward=reward)


def group(gid, *versions, rewards=None, incarnation=0) -> TrajectoryGroup:
    rewards = rewards or [float(i % 2) for i in range(len(versions))]
    return TrajectoryGroup(group_id=gid, trajectories=[traj(v, r) for v, r in zip(versions, rewards)],
                           incarnation=incarnation)


# --------------------------------------------------------------------------- the rule


def test_a_groups_versions_are_its_action_tokens_mean_newest_and_oldest():
    # A long sequence that in-flight updates reached: 2 tokens of v0, 6 of v3; a short one of v3.
    g = group("g", [0, 0, 3, 3, 3, 3, 3, 3], [3, 3])
    assert group_versions(g) == Versions(version=(0 * 2 + 3 * 8) // 10, newest=3, oldest=0) == Versions(2, 3, 0)


def test_the_floor_of_the_mean_bounds_the_mean_lag_exactly():
    rng = random.Random(0)
    for _ in range(2000):
        versions = [rng.randrange(0, 9) for _ in range(rng.randrange(1, 12))]
        u, s = rng.randrange(0, 12), rng.randrange(0, 4)
        mean = Fraction(sum(versions), len(versions))
        assert is_stale(sum(versions) // len(versions), u, s) == (u - mean > s), (versions, u, s)


def test_a_long_sequence_is_served_for_its_fresh_tokens_and_a_mostly_old_one_is_dropped(tmp_path):
    buf = ExperienceBuffer(tmp_path / "buffer", vocab_size=VOCAB, max_staleness=1)
    try:
        long_fresh = group("long_fresh", [0] * 2 + [3] * 10, [3, 3])  # oldest lag 3, mean lag 3 - 2.57 = 0.43
        mostly_old = group("mostly_old", [0] * 10 + [3] * 2, [1, 1])  # mean lag 3 - 0.57 = 2.43
        assert buf.add_many([long_fresh, mostly_old]) == ["accepted", "accepted"]
        batch = buf.batch(BatchRequest(sender="l", learner_version=3, after_seq=0, max_groups=8))
        assert [g.group_id for g in batch.groups] == ["long_fresh"] and batch.dropped == {"stale": 1}
        assert buf.stats()["stale_reasons"]["too_old"] == 1
    finally:
        buf.close()


def test_a_store_from_before_per_token_staleness_opens_and_serves(tmp_path):
    buf = ExperienceBuffer(tmp_path / "buffer", vocab_size=VOCAB, max_staleness=1)
    buf.add_many([group("a", [1, 1], [1, 1]), group("b", [2, 2], [2, 2])])
    buf.close()
    db = sqlite3.connect(tmp_path / "buffer" / DB_NAME)
    db.execute("ALTER TABLE payloads DROP COLUMN newest")  # the schema as it was
    db.commit()
    db.close()
    buf = ExperienceBuffer(tmp_path / "buffer", vocab_size=VOCAB, max_staleness=1)
    try:
        batch = buf.batch(BatchRequest(sender="l", learner_version=1, after_seq=0, max_groups=8))
        assert batch.seqs == [1] and batch.dropped == {"stale": 1}  # b's version 2 is the learner's future
        assert buf.stats()["stale_reasons"]["future_version"] == 1
    finally:
        buf.close()


# --------------------------------------------------------------------------- admission


def test_an_inflight_rollout_protects_no_deadline_and_a_finished_group_its_mean():
    line = CreditLine("tcp://127.0.0.1:1", lambda: None, lambda: None)
    line.hold("rollout-1", 0, rolling=True)
    assert line.oldest() == 0  # between requests: every token of its turn is of version 0
    line.inflight = True
    line.hold("rollout-2", 0, rolling=True)
    assert line.oldest() == 0  # rollout-1 was held before: still protected
    line.release("rollout-1")
    assert line.oldest() == -1  # rollout-2 takes each new adapter: its lag only shrinks
    line.hold("g", 2)  # finished, at its tokens' mean version, until acknowledged
    assert line.oldest() == 2


def test_a_long_rollout_holds_the_window_between_requests_and_not_inflight():
    gpb, staleness = 4, 1
    adm = Admission(gpb, staleness)
    adm.learner_at(BatchRequest(sender="l", learner_version=1, after_seq=4, max_groups=gpb))  # places 4..
    # One long rollout started with version 0 (its deadline: place 8), the explorer now at version 1.
    between = CreditRequest(sender="e", version=1, incarnation=0, holding=1, started=9, want=100, oldest=0)
    assert adm.grant(between, lambda seq: 0).start_until - 9 == 8 - 4 - 1  # only 3 more may pass it
    inflight = msgspec.structs.replace(between, oldest=-1)
    assert adm.grant(inflight, lambda seq: 0).start_until - 9 == 12 - 4 - 1  # the whole window of version 1


def test_oversampling_lets_more_groups_be_held_than_places():
    adm = Admission(4, 1, oversample=2.5)
    adm.learner_at(BatchRequest(sender="l", learner_version=0, after_seq=0, max_groups=4))
    ask = CreditRequest(sender="e", version=0, incarnation=0, holding=0, started=0, want=100)
    assert adm.grant(ask, lambda seq: 0).start_until == 20  # 8 places, 2.5 groups each
    # 6 accepted (6 places), 3 held: 2 places left hold 5 groups, 2 more may start.
    assert adm.grant(msgspec.structs.replace(ask, holding=3, started=20), lambda seq: 6).start_until == 22
    plain = Admission(4, 1)
    plain.learner_at(BatchRequest(sender="l", learner_version=0, after_seq=0, max_groups=4))
    assert plain.grant(ask, lambda seq: 0).start_until == 8


# --------------------------------------------------------------------------- the learner's figures


def test_the_learner_logs_the_token_weighted_mean_lag_and_the_oldest_tokens():
    groups = [group("a", [0, 0, 3, 3, 3, 3, 3, 3], [3, 3]), group("b", [2, 2], [2, 2])]
    record = batch_metrics(groups, step=3)
    tokens = [0, 0, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2]
    assert record["staleness/mean"] == pytest.approx(sum(3 - v for v in tokens) / len(tokens))
    assert record["staleness/max"] == 3  # the oldest token's lag
    assert record["staleness/group_max"] == 1  # what the buffer bounds: a's 3 - floor(2.4), b's 3 - 2


# --------------------------------------------------------------------------- no-signal hunting


class ScriptedBuffer:
    """A fake buffer (a real RequestServer on a thread) answering BatchRequests from a script
    of (groups, cumulative no_signal drops); the last answer repeats."""

    def __init__(self, script):
        self.address, self.script = tcp_address(), list(script)
        self.requests: list[BatchRequest] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        with RequestServer(self.address) as server:
            while not self._stop.is_set():
                if (got := server.recv(0.05)) is not None:
                    self.requests.append(got[1])
                    groups, no_signal = self.script.pop(0) if len(self.script) > 1 else self.script[0]
                    after = got[1].after_seq
                    server.reply(got[0], Batch(groups=groups, seqs=list(range(after + 1, after + 1 + len(groups))),
                                               dropped={"no_signal": no_signal}))

    def close(self):
        self._stop.set()
        self._thread.join(5)


def fetcher(tmp_path, address, **buffer) -> BatchFetcher:
    config = learner_config(tmp_path)  # 4 groups a batch
    config = msgspec.structs.replace(
        config, learner=msgspec.structs.replace(config.learner, batch_timeout_s=20.0),
        addresses=msgspec.structs.replace(config.addresses, batches=address),
        buffer=msgspec.structs.replace(config.buffer, **buffer))
    return BatchFetcher(config, "r", 1, lambda: 0, lambda groups: [])


def signal(gid):
    return group(gid, [0, 0], [0, 0], rewards=[0.0, 1.0])


def test_at_the_bound_the_learner_trains_on_the_groups_with_signal_it_has(tmp_path):
    # One group with signal, then the buffer drops no-signal groups: 3, 6, 9 ... (8 tried = 2 batches' worth).
    buffer = ScriptedBuffer([([signal("s1")], 0), ([], 3), ([], 6), ([], 9)])
    fetch = fetcher(tmp_path, buffer.address, max_tried_batches=2, at_max_tried="train")
    try:
        batch, _, hunt = fetch.submit(0, 0).result(timeout=30)
    finally:
        fetch.close()
        buffer.close()
    assert [g.group_id for g in batch.groups] == ["s1"]
    assert hunt == {"buffer/tried": 10.0, "buffer/no_signal_frac": 0.9}


def test_at_the_bound_the_run_stops_with_what_was_tried_and_what_to_do(tmp_path):
    buffer = ScriptedBuffer([([signal("s1")], 5), ([], 40)])
    fetch = fetcher(tmp_path, buffer.address, max_tried_batches=2, at_max_tried="stop")
    try:
        with pytest.raises(Unrecoverable) as stopped:
            fetch.submit(0, 0).result(timeout=30)
    finally:
        fetch.close()
        buffer.close()
    message = str(stopped.value)
    assert message.startswith("no-signal hunting stopped at buffer.max_tried_batches = 2: 41 groups tried for "
                              "batch 1, 40 with every reward equal (98%), 1/4 groups with signal"), message
    assert "buffer.at_max_tried" in message


def test_hunting_is_counted_per_batch_and_no_signal_groups_in_the_batch_count_too(tmp_path):
    flat = group("flat", [0, 0], [0, 0], rewards=[1.0, 1.0])  # trained anyway (drop_constant_reward_groups off)
    buffer = ScriptedBuffer([([signal("a"), signal("b")], 10), ([signal("c"), flat], 12),
                             ([signal("d"), signal("e"), signal("f"), signal("g")], 12)])
    fetch = fetcher(tmp_path, buffer.address, max_tried_batches=0)  # no bound
    try:
        _, _, first = fetch.submit(0, 0).result(timeout=30)
        _, _, second = fetch.submit(4, 1).result(timeout=30)
    finally:
        fetch.close()
        buffer.close()
    assert first == {"buffer/tried": 16.0, "buffer/no_signal_frac": 13 / 16}  # 12 dropped and "flat"
    assert second == {"buffer/tried": 4.0, "buffer/no_signal_frac": 0.0}  # none dropped since the first


def test_the_console_warns_when_most_groups_carry_no_signal_and_not_every_step():
    record = {"step": 7, "buffer/no_signal_frac": 0.9, "buffer/tried": 40.0}
    warning = no_signal_warning(record, None)
    assert warning.startswith("step 7: 90% of the 40 groups tried carried no signal") and "buffer.oversample" in warning
    assert no_signal_warning({**record, "step": 8}, 7) is None  # said a step ago
    assert no_signal_warning({**record, "step": 27}, 7) is not None
    assert no_signal_warning({**record, "buffer/no_signal_frac": 0.4}, None) is None


def test_rlpipe_stats_figures_weigh_each_step():
    records = [{"step": 1, "staleness/mean": 1.0, "staleness/max": 2.0, "tokens/sampled": 300.0,
                "buffer/no_signal_frac": 0.5, "buffer/tried": 8.0},
               {"step": 2, "staleness/mean": 0.0, "staleness/max": 0.0, "tokens/sampled": 100.0,
                "buffer/no_signal_frac": 0.0, "buffer/tried": 4.0}]
    assert lag_figures(records) == {"lag_mean": 0.75, "lag_max": 2.0, "groups_tried": 12, "no_signal_frac": 4 / 12}
    assert lag_figures([{"step": 1}]) == {}
