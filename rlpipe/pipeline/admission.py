"""The global admission budget: how many groups all explorers together may start, so that each
of them can still be trained within max_staleness. The buffer keeps it (`Admission`): it sees
the learner's BatchRequests and every group accepted; each explorer asks it for credits over
its own DEALER to the experience socket (`CreditLine`). The staleness rule itself stays in
one place, the buffer's serve-time check (buffer.is_stale); this only keeps explorers from
starting work that check would throw away.

Where the learner is. Its latest BatchRequest (learner_version u, after_seq a, max_groups m)
says that the groups accepted after seq a fill batch u from its place gpb - m on, then batch
u + 1, and so on, in seq order (gpb = groups_per_batch). Numbering places from

    slot = u * gpb + (gpb - m)          (the place of the first group after a)

the pending groups (accepted, after a, still in the store) take places slot ... slot +
pending - 1, and the k-th group accepted from now on is trained at version
(slot + pending + k) // gpb. A group dropped at serve time only moves later groups forward.

The budget. A group started with adapter version v is trained in time if its place is below
its deadline D(v) = (v + max_staleness + 1) * gpb. Groups are accepted in whatever order the
explorers finish them, so in the worst case every credit outstanding is used before any
given one: after a grant, the total `slot + pending + all outstanding` must stay within the
deadline of every group it could push back, the new ones and those already held. An explorer
e (adapter v_e; holding h_e groups: rolling out, or finished and not yet acknowledged, the
oldest started with version o_e; s_e started so far) that wants w more is given

    total   = slot + pending + h_e + sum of the others' outstanding
    bound   = min(D(v_e), D(o_e), each other explorer's deadline D(min(its v, its o)))
    given_e = min(w, max(bound - total, 0))        start_until_e = s_e + given_e

and may start groups while its started count is below start_until_e; its outstanding is h_e +
given_e. Shared fairly: the explorers that asked for more than they got split what the others
do not hold, none being given more than it needs to hold ceil((bound - slot - pending - what
the satisfied ones hold) / how many want more), so a fast explorer that asks first does not
take the whole window and leave the other engines idle. (A deadline already passed by slot +
pending protects nothing, as every pending group is served first: it is left out of the min, so
an explorer whose groups are lost anyway does not stop the others. An explorer that lags,
holding groups of an older version, holds the others back only until those return or its lease
ends.) The explorer reports its whole state in every request (never a difference), so a lost
request or reply cannot make the count drift. A credit is spent by starting a group (unused ->
held: the same outstanding) and comes back when the group returns with any outcome: an accepted
group moves into `pending`, a dropped one (no_signal with buffer.drop_constant_reward_groups,
env_error, invalid) takes no place at all, so the explorer rolls out another instead. Between a
group's acceptance and its explorer's next report it is counted twice (held and pending): the
error is on the safe side, never the other (a cap on what is held would let acknowledged groups
free places they still take).

Which version a held group's deadline is of (per-token staleness, docs/pipeline.md): the
buffer bounds a group's token-weighted mean lag, so a held group is protected at the version
it will be trained as. A finished group (not yet acknowledged) has its action tokens' mean
version, known exactly. A rollout sampled between requests keeps the version it started with
for its current turn: its deadline is that version's (single-turn: every token's). A rollout
that in-flight weight updates keep fresh (explorer.weight_updates = "inflight") protects no
deadline: its next tokens come from the newest adapter, so it does not hold the budget back
while the learner moves on. That is why long groups held their credits: a long rollout of
version o, protected at D(o), stops every explorer once slot + pending + held reaches D(o),
i.e. the learner waits for the long tail every max_staleness + 1 batches. Between requests
that wait is the price of the bound (every token of the long rollout is of version o: any
definition of its lag gives the same number, so the alternatives are dropping it, which
throws the longest work away and biases training towards short answers, or training it past
the bound); with in-flight updates the rollout's lag shrinks as it goes, and it no longer
holds anyone back. It can still end too stale on the mean if it spans more than about
2 * max_staleness versions; the buffer then drops it and counts it (stale: too_old).

Oversampling (buffer.oversample = k, DAPO's dynamic sampling): when most groups carry no
signal, and the buffer drops them (they take no place), a window of places fills only slowly.
With k > 1 every group held or granted takes 1/k of a place: room = floor((bound - base) * k)
groups may be held at once, expecting 1 in k to be accepted. If more carry signal than that,
the surplus is trained later or dropped stale, counted, as DAPO throws its surplus away.

Leases. A grant is counted by the buffer for LEASE_S after its request arrived, and used by
the explorer only until lease_s / 2 after it sent the request; the explorer renews every
lease_s / 4 and whenever it wants more. An explorer that dies or freezes (SIGSTOP) stops
renewing, so after LEASE_S its credits go back to the others: it cannot hold them back.
Whatever it delivers later is checked (and counted, if stale) by the buffer as always.

What is not known yet: before the learner's first BatchRequest to this buffer (a buffer just
(re)started, a learner of a newer incarnation that has not asked yet) nothing is granted;
the learner asks as soon as it waits for a batch. An explorer following an older learner
incarnation is granted nothing: its groups would be dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from rlpipe.pipeline import aio_transport, transport
from rlpipe.pipeline.supervised import Supervised
from rlpipe.types import BatchRequest, CreditGrant, CreditRequest

log = logging.getLogger(__name__)

LEASE_S = 6.0
"""How long the buffer counts an explorer's credits after its last request."""
ASK_EVERY_S = 0.1
"""How often an explorer that wants credits and got none asks again (also woken by events)."""
REQUEST_TIMEOUT_S = 2.0


@dataclass(slots=True)
class Holder:
    outstanding: int  # held + granted but not started yet
    deadline: int  # the place its oldest outstanding group must stay below
    wants: bool  # it asked for more than it got
    holding: int
    version: int
    incarnation: int
    expires: float


@dataclass(slots=True)
class Position:
    incarnation: int
    slot: int
    after_seq: int


class Admission:
    """The buffer's side: the learner's position and each explorer's outstanding credits."""

    def __init__(self, groups_per_batch: int, max_staleness: int, *, run_id: str = "", lease_s: float = LEASE_S,
                 clock: Callable[[], float] = time.monotonic, oversample: float = 1.0):
        self.gpb = groups_per_batch
        self.max_staleness = max_staleness
        self.oversample = oversample
        """buffer.oversample: groups held or granted take 1/oversample of a place each."""
        self.run_id = run_id
        self.lease_s = lease_s
        self.clock = clock
        self.learner: Position | None = None
        self.holders: dict[str, Holder] = {}
        self.counts: dict[str, int] = {"requests": 0, "granted": 0}
        """Requests answered, credits granted, and requests that got nothing new by reason."""

    def learner_at(self, request: BatchRequest) -> None:
        """Note where the learner is: call with every BatchRequest the buffer answers (not a refused one)."""
        if self.learner is not None and request.incarnation < self.learner.incarnation:
            return
        offset = max(0, self.gpb - request.max_groups)
        self.learner = Position(request.incarnation, request.learner_version * self.gpb + offset, request.after_seq)

    def grant(self, request: CreditRequest, pending: Callable[[int], int]) -> CreditGrant:
        """Answer one explorer; pending(after_seq) counts the accepted groups after after_seq
        still in the store."""
        now = self.clock()
        self._expire(now)
        self.counts["requests"] += 1
        holding, want = max(0, request.holding), max(0, request.want)
        learner = self.learner
        if self.run_id and request.run_id and request.run_id != self.run_id:
            return self._answer(request, None, 0, "other_run", now)
        if request.version < 0:
            return self._answer(request, holding, 0, "no_weights", now)
        if learner is None or request.incarnation > learner.incarnation:
            return self._answer(request, holding, 0, "learner_unknown", now)
        if request.incarnation < learner.incarnation:
            return self._answer(request, 0, 0, "incarnation", now)  # its groups will be dropped: they take no place
        base = learner.slot + pending(learner.after_seq)
        others = [h for name, h in self.holders.items() if name != request.sender and h.outstanding > 0]
        held = [h.deadline for h in others]  # of groups held or granted: not to be pushed past
        if holding and request.oldest >= 0:
            held.append(self._deadline(request.oldest))
        bound = min([self._deadline(request.version), *(d for d in held if d > base)])
        # The groups that may be held at once: the free places, each shared by `oversample` groups.
        room = int((bound - base) * self.oversample) if bound > base else bound - base
        satisfied = sum(h.outstanding for h in others if not h.wants)
        wanting = 1 + sum(1 for name, h in self.holders.items() if name != request.sender and h.wants)
        share = -(-(room - satisfied) // wanting)  # ceil
        given = max(0, min(want, room - holding - sum(h.outstanding for h in others), share - holding))
        self.counts["granted"] += given
        return self._answer(request, holding + given, given, "" if given == want else "budget", now)

    def _deadline(self, version: int) -> int:
        """The first place a group sampled with `version` would be too stale for."""
        return (version + self.max_staleness + 1) * self.gpb

    def _answer(self, request: CreditRequest, outstanding: int | None, given: int, reason: str,
                now: float) -> CreditGrant:
        if reason:
            self.counts[reason] = self.counts.get(reason, 0) + 1
        if outstanding is None:
            self.holders.pop(request.sender, None)
        else:
            oldest = min(request.version, request.oldest) if request.holding and request.oldest >= 0 else request.version
            wants = given < request.want and reason != "incarnation"  # one that cannot use credits takes no share
            self.holders[request.sender] = Holder(outstanding, self._deadline(oldest), wants,
                                                  request.holding, request.version, request.incarnation,
                                                  now + self.lease_s)
        return CreditGrant(start_until=max(0, request.started) + given, lease_s=self.lease_s, reason=reason)

    def _expire(self, now: float) -> None:
        for name, holder in list(self.holders.items()):
            if holder.expires < now:
                log.info("admission: %s sent no credit request for %.0f s; its %d credits go back to the others",
                         name, self.lease_s, holder.outstanding)
                del self.holders[name]
                self.counts["expired"] = self.counts.get("expired", 0) + 1

    def stats(self) -> dict:
        self._expire(self.clock())
        learner = self.learner
        return {**self.counts,
                "learner": None if learner is None else {"incarnation": learner.incarnation, "slot": learner.slot,
                                                         "after_seq": learner.after_seq},
                "explorers": {name: {"outstanding": h.outstanding, "holding": h.holding, "version": h.version}
                              for name, h in sorted(self.holders.items())}}


class CreditLine:
    """The explorer's side: keeps the grant current over a DEALER of its own to the buffer's
    experience socket (the outbox sender has another, so acknowledgements and credits never
    wait on each other). state() says what to report, or None while there is nothing to ask
    (no adapter yet); on_grant() is called after every grant. run() in the explorer's task
    group; start() and stop() run it on a thread of its own (supervised.Supervised)."""

    def __init__(self, address: str, state: Callable[[], CreditRequest | None], on_grant: Callable[[], None],
                 name: str = "rlpipe-credits"):
        self.address = address
        self.state = state
        self.on_grant = on_grant
        self.last: CreditGrant | None = None
        self._grant = (0, 0.0)  # (start_until, usable until: monotonic)
        self._held: dict[str, int] = {}  # what the explorer holds -> the version its deadline is of
        self.inflight = False
        """explorer.weight_updates == "inflight": rollouts take each new adapter at their next token."""
        self.task = Supervised(self._ask, name)
        self.run, self.wake = self.task.run, self.task.wake

    def start(self) -> CreditLine:
        self.task.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self.task.stop(timeout_s)

    @property
    def alive(self) -> bool:
        return self.task.alive

    @property
    def error(self) -> BaseException | None:
        return self.task.error

    @property
    def start_until(self) -> int:
        """The explorer may start a group while its started count is below this (0 once the
        grant is too old to use)."""
        start_until, usable_until = self._grant
        return start_until if time.monotonic() < usable_until else 0

    def unused(self, started: int) -> int:
        return max(0, self.start_until - started)

    def reset(self) -> None:
        """Forget the grant (the explorer follows a new learner incarnation) and ask again."""
        self._grant = (0, 0.0)
        self.wake()

    def hold(self, key: str, version: int, rolling: bool = False) -> None:
        """A group the explorer holds and the version it is to be trained as, reported as
        `oldest`, its deadline: a rollout with the adapter version it started with, then, once
        finished and until acknowledged, its group id with its action tokens' mean version
        (validation.group_versions). A rollout that in-flight weight updates keep fresh
        (rolling=True with self.inflight) has no deadline to protect: its next tokens are
        sampled by the newest adapter, so its mean version only grows."""
        if rolling and self.inflight:
            self._held.pop(key, None)
        else:
            self._held[key] = version

    def release(self, key: str) -> None:
        self._held.pop(key, None)

    def oldest(self) -> int:
        """The oldest version among the groups held with a deadline, -1 if none."""
        return min(self._held.values(), default=-1)

    async def _ask(self) -> None:
        client = aio_transport.RequestClient(self.address, max_message_bytes=transport.SMALL_MAX_BYTES,
                                             max_request_bytes=transport.SMALL_MAX_BYTES)
        try:
            renew_at = 0.0
            refused, refused_at = None, 0.0  # what the last request that got less than it wanted reported, and when
            while True:
                request = self.state()
                now = time.monotonic()
                if request is None:  # no adapter yet: nothing to ask
                    await self.task.nap(1.0)
                    continue
                wanted = self.unused(request.started) < request.want
                # Refused a moment ago, and nothing changed on this side that could open the budget
                # (a newer adapter, a group returned): only the learner's progress can, which the
                # buffer sees and this explorer does not; ask again after ASK_EVERY_S.
                state = (request.version, request.incarnation, request.holding)
                unchanged = refused is not None and state[:2] == refused[:2] and state[2] >= refused[2]
                wait_s = ASK_EVERY_S - (now - refused_at) if wanted and unchanged else 0.0
                if (wanted and wait_s <= 0) or now >= renew_at:
                    reply = await client.request(request, REQUEST_TIMEOUT_S)
                    if isinstance(reply, CreditGrant):
                        self._grant = (reply.start_until, now + reply.lease_s / 2)
                        self.last = reply
                        renew_at = now + reply.lease_s / 4
                        self.on_grant()
                        short = reply.start_until - request.started < request.want
                        refused, refused_at = (state, now) if short else (None, 0.0)
                        wait_s = ASK_EVERY_S if short else 0.0
                    elif reply is not None:
                        log.warning("the buffer at %s answered a credit request with %r", self.address, reply)
                    else:
                        renew_at = 0.0  # no answer (the buffer is away): ask again at once
                until_renewal = renew_at - time.monotonic()
                await self.task.nap(min(max(wait_s if wait_s > 0 else until_renewal, 0.01), 1.0))
        finally:
            client.close()
