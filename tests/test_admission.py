"""The global admission budget (rlpipe/pipeline/admission.py): the rule on its own, with a
fake clock, then over the buffer's real experience socket. Three explorers through `rlpipe run`
are tests/test_multi_explorer.py."""

from __future__ import annotations

import threading
import time

from rlpipe.pipeline import transport
from rlpipe.pipeline.admission import Admission, CreditLine
from rlpipe.pipeline.buffer import serve
from rlpipe.types import BatchRequest, CreditGrant, CreditRequest

GPB, STALENESS = 4, 1  # a window of (1 + 1) * 4 = 8 places ahead of the learner


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def learner(version: int, after_seq: int, max_groups: int = GPB, incarnation: int = 1) -> BatchRequest:
    return BatchRequest(sender="learner", learner_version=version, after_seq=after_seq, max_groups=max_groups,
                        incarnation=incarnation)


def ask(adm: Admission, name: str, *, version: int = 0, holding: int = 0, started: int = 0, want: int = 100,
        oldest: int = -1, incarnation: int = 1, pending: int = 0) -> CreditGrant:
    request = CreditRequest(sender=name, version=version, incarnation=incarnation, holding=holding, started=started,
                            want=want, oldest=oldest)
    return adm.grant(request, lambda after_seq: pending)


def given(grant: CreditGrant, started: int = 0) -> int:
    return grant.start_until - started


def test_nothing_before_the_learner_asks_then_the_window():
    adm = Admission(GPB, STALENESS, clock=Clock())
    assert given(ask(adm, "e0")) == 0 and ask(adm, "e0").reason == "learner_unknown"
    adm.learner_at(learner(version=0, after_seq=0))
    assert given(ask(adm, "e0")) == (STALENESS + 1) * GPB  # alone: the whole window
    assert ask(adm, "e0", version=-1).reason == "no_weights"


def test_what_is_held_accepted_or_granted_takes_places_and_a_returned_group_gives_its_credit_back():
    adm = Admission(GPB, STALENESS, clock=Clock())
    adm.learner_at(learner(version=0, after_seq=0))
    assert given(ask(adm, "e0", want=3)) == 3
    assert given(ask(adm, "e0", holding=3, started=3, want=100), 3) == 5  # 3 held + 5 = the window
    # 6 accepted (pending at the buffer), 2 still held: nothing more until the learner moves on.
    grant = ask(adm, "e0", holding=2, started=8, pending=6)
    assert given(grant, 8) == 0 and grant.reason == "budget"
    # Two of the held ones were dropped at intake (no_signal): they took no place, two more may start.
    assert given(ask(adm, "e0", holding=0, started=8, pending=6), 8) == 2
    # The learner took batch 0 and asks for batch 1 after seq 4: places 4..11 are in the window
    # of adapter 1, and the 4 pending groups take 4..7.
    adm.learner_at(learner(version=1, after_seq=4))
    assert given(ask(adm, "e0", version=1, holding=0, started=8, pending=4), 8) == 4
    # Mid-batch: the learner has 3 of batch 1 and asks for 1 more; with adapter 0 the window ends at place 8.
    adm.learner_at(learner(version=1, after_seq=7, max_groups=1))
    assert given(ask(adm, "e0", version=0, holding=0, started=16, pending=0), 16) == 1


def test_explorers_share_the_window_and_a_silent_one_loses_its_credits():
    clock = Clock()
    adm = Admission(GPB, STALENESS, clock=clock)
    assert ask(adm, "e1").reason == "learner_unknown"  # e1 is known to want credits
    adm.learner_at(learner(version=0, after_seq=0))
    assert given(ask(adm, "e0")) == 4  # half of the 8 places: e1 wants too
    assert given(ask(adm, "e1")) == 4
    assert given(ask(adm, "e2")) == 0  # the window is taken
    # e0 froze (no renewal): after the lease its credits go back to the others.
    clock.now += 3.0
    ask(adm, "e1", holding=4, started=4)
    ask(adm, "e2")
    clock.now += adm.lease_s - 1.0
    assert given(ask(adm, "e2")) == 4
    assert adm.counts["expired"] == 1 and "e0" not in adm.holders


def test_a_lagging_explorers_groups_are_not_pushed_past_their_deadline():
    adm = Admission(GPB, STALENESS, clock=Clock())
    adm.learner_at(learner(version=1, after_seq=4))  # batch 1 next: places 4.. ; adapter 0 is good up to place 8
    ask(adm, "slow", version=0, holding=2, started=2, want=0, oldest=0)
    # A fresh explorer at version 1 could go up to place 12, but its groups may be accepted before
    # the slow one's: only 8 - (4 + 2) = 2 places keep those in time.
    assert given(ask(adm, "fast", version=1)) == 2
    # Once the slow one's groups are back (accepted: pending), the fast one has the rest.
    ask(adm, "slow", version=1, holding=0, started=2, want=0, pending=2)
    assert given(ask(adm, "fast", version=1, holding=2, started=2, pending=2), 2) == 4
    # A deadline every pending group already passes protects nothing: it does not stop the others.
    adm.learner_at(learner(version=3, after_seq=8))
    ask(adm, "slow", version=0, holding=1, started=3, want=0, oldest=0)
    assert given(ask(adm, "fast", version=3, holding=0, started=8), 8) == 7  # 8 places, 1 held by slow


def test_an_explorer_of_a_replaced_learner_gets_nothing_and_counts_for_nothing():
    adm = Admission(GPB, STALENESS, clock=Clock())
    adm.learner_at(learner(version=5, after_seq=20, incarnation=2))
    grant = ask(adm, "old", version=9, incarnation=1, holding=3)
    assert given(grant) == 0 and grant.reason == "incarnation" and adm.holders["old"].outstanding == 0
    assert ask(adm, "ahead", version=5, incarnation=3).reason == "learner_unknown"
    adm.learner_at(learner(version=0, after_seq=0, incarnation=1))  # a zombie of the replaced learner: ignored
    assert adm.learner.incarnation == 2
    assert given(ask(adm, "new", version=5, incarnation=2, want=3)) == 3


def test_credits_over_the_buffers_experience_socket(tmp_path):
    """The real socket: a CreditLine against serve(), and the learner's BatchRequest that opens the window."""
    exp, batches = transport.tcp_address(), transport.tcp_address()
    stop, ready, seen = threading.Event(), threading.Event(), []
    buffer = threading.Thread(target=serve, args=(tmp_path / "buffer", exp, batches), daemon=True,
                              kwargs={"vocab_size": 100, "max_staleness": STALENESS, "groups_per_batch": GPB,
                                      "stop": stop, "ready": ready, "on_stats": seen.append, "stats_interval_s": 0.1})
    buffer.start()
    assert ready.wait(10)
    state = {"holding": 0, "started": 0, "want": 3}
    granted = threading.Event()
    line = CreditLine(exp, lambda: CreditRequest(sender="e0", version=0, incarnation=1, **state),
                      granted.set).start()
    try:
        deadline = time.monotonic() + 10
        while line.last is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert line.last is not None and line.last.reason == "learner_unknown" and line.start_until == 0
        with transport.RequestClient(batches) as client:  # the learner asks for batch 0: the window opens
            assert client.request(learner(version=0, after_seq=0), timeout_s=5) is not None
        line.wake()
        deadline = time.monotonic() + 10
        while line.start_until < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert line.start_until == 3 and line.unused(0) == 3
        time.sleep(0.3)
        assert seen[-1]["admission"]["explorers"]["e0"]["outstanding"] == 3
    finally:
        line.stop()
        stop.set()
        buffer.join(10)
    assert not line.alive and line.error is None
