"""What the buffer accepts: one rule set, applied by the buffer at intake and by the explorer
(to know which of its groups will count toward a batch).

A group is trainable if every trajectory has tokens in [0, vocab_size), an action mask of
0/1 with at least one action token, finite sampling logprobs <= 0, a policy version >= 0 on
every action token, per-token lists of equal length, and finite reward and advantage. The
value checks run inside msgspec's decoder (C, at the cost of the decode itself): a 4k-token
group is decoded and validated in about a quarter of a millisecond.
"""

from __future__ import annotations

import functools
import sys
import typing
from itertools import compress
from typing import Annotated, NamedTuple

import msgspec

from rlpipe.types import Message, Trajectory, TrajectoryGroup

MAX_GROUP_ID = 256
"""Longer (or empty) group ids cannot be deduplicated: such groups are dropped as invalid."""
MAX_INT64 = (1 << 63) - 1

_encoder = msgspec.msgpack.Encoder()


@functools.lru_cache(maxsize=8)
def checked_decoder(vocab_size: int) -> msgspec.msgpack.Decoder:
    """A decoder of Message whose TrajectoryGroup checks token ids, action masks, logprobs and
    rewards while it decodes. Its structs are TrajectoryGroup and Trajectory field for field
    (made from their definitions, so they cannot drift), with value constraints added."""
    finite = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]  # NaN fails both
    int64 = Annotated[int, msgspec.Meta(le=MAX_INT64)]  # msgpack ints reach 2**64 - 1; the store's do not
    trajectory = _constrained(Trajectory, {
        "tokens": Annotated[list[Annotated[int, msgspec.Meta(ge=0, lt=vocab_size)]], msgspec.Meta(min_length=1)],
        "action_mask": list[Annotated[int, msgspec.Meta(ge=0, le=1)]],
        "sampling_logprobs": list[Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=0.0)]],
        "policy_versions": list[int64], "reward": finite, "advantage": finite})
    group = _constrained(TrajectoryGroup, {"trajectories": list[trajectory],
                                           "incarnation": Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]})
    # In a union the "type" tag is required, as in Message: an untagged map is no group.
    others = tuple(t for t in typing.get_args(Message) if t is not TrajectoryGroup)
    return msgspec.msgpack.Decoder(typing.Union[(group, *others)])


def _constrained(struct: type, types: dict) -> type:
    fields = []
    for f in msgspec.structs.fields(struct):
        kind = types.get(f.name, f.type)
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, kind, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, kind, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, kind))
    config = struct.__struct_config__
    return msgspec.defstruct(f"Checked{struct.__name__}", fields, tag=config.tag, tag_field=config.tag_field,
                             omit_defaults=True)


_PROBLEMS = {"tokens": "token id outside [0, {vocab})", "action_mask": "action_mask values must be 0 or 1",
             "sampling_logprobs": "sampling_logprobs must be finite and <= 0",
             "reward": "reward or advantage is not finite", "advantage": "reward or advantage is not finite"}


def explain(err: msgspec.MsgspecError, vocab_size: int) -> str:
    """A checked decode's error as a problem a person can act on, with msgspec's own text."""
    text = str(err)
    field = text.rpartition("`$")[2].rstrip("`").rsplit(".", 1)[-1].split("[", 1)[0]
    if "got `" in text or field not in _PROBLEMS:  # a wrong type or shape, not a bad value
        return f"schema: {text}"
    if field == "tokens" and "length" in text:
        return f"a trajectory has no tokens ({text})"
    return f"{_PROBLEMS[field].format(vocab=vocab_size)} ({text})"


def check(group: TrajectoryGroup, vocab_size: int) -> tuple[typing.Any, str | None, bytes | None]:
    """(the group as checked, problem or None, its msgpack bytes or None), for a group made in
    this process. It goes through the bytes, as the buffer sees it: what does not encode and
    decode again (a numpy int, a float token) could never be stored and served."""
    try:
        body = _encoder.encode(group)
    except (TypeError, ValueError, OverflowError) as e:  # ValueError: a str that is no valid UTF-8
        return group, f"schema: {e}", None
    try:
        return checked_decoder(vocab_size).decode(body), None, body
    except msgspec.MsgspecError as e:
        return group, explain(e, vocab_size), None


class Versions(NamedTuple):
    """The policy versions of a group's action tokens, as the staleness rule uses them
    (docs/pipeline.md, "Staleness"): `version` is the floor of their token-weighted mean (what
    the rule bounds: a group is trained at u only if u - version <= max_staleness, which is
    exactly "mean lag <= max_staleness"), `newest` the newest (none may be from the learner's
    future), `oldest` the oldest (reported as the lag's max, not bounded)."""

    version: int
    newest: int
    oldest: int


NO_VERSIONS = Versions(0, 0, 0)


def group_versions(group) -> Versions:
    """Versions of a validated group's action tokens (see Versions)."""
    total = count = 0
    newest, oldest = -1, None
    for t in group.trajectories:
        acted = list(compress(t.policy_versions, t.action_mask))
        total += sum(acted)
        count += len(acted)
        newest = max(newest, *acted)
        oldest = min(acted) if oldest is None else min(oldest, *acted)
    return Versions(total // count, newest, oldest)  # versions are >= 0: // is the floor


def no_signal(group) -> bool:
    """Every reward of the group is the same: with group-centred advantages it teaches nothing."""
    return len({t.reward for t in group.trajectories}) == 1


def why_dropped(group, problem: str | None, drop_no_signal: bool) -> tuple[str | None, str | None, Versions]:
    """(drop reason, detail, action versions) of a decoded group; problem is what its
    checked decode found. The reason is None for a group to accept."""
    if group.failed:
        return "env_error", group.error, NO_VERSIONS
    if not 0 < len(group.group_id) <= MAX_GROUP_ID:
        return "invalid", f"group_id must have 1 to {MAX_GROUP_ID} characters", NO_VERSIONS
    versions = NO_VERSIONS
    if problem is None:
        problem = _inspect(group)
    if problem is not None:
        return "invalid", problem, NO_VERSIONS
    versions = group_versions(group)
    if drop_no_signal and no_signal(group):
        return "no_signal", None, versions
    return None, None, versions


def _inspect(group) -> str | None:
    """The checks the decoder cannot make: the problem, or None."""
    if not group.trajectories:
        return "group has no trajectories"
    for i, t in enumerate(group.trajectories):
        n = len(t.tokens)
        for name in ("action_mask", "sampling_logprobs", "policy_versions"):
            if (m := len(getattr(t, name))) != n:
                return f"trajectory {i}: {name} has {m} entries for {n} tokens"
        version = min(compress(t.policy_versions, t.action_mask), default=None)
        if version is None:
            return f"trajectory {i}: no action tokens"
        if version < 0:
            return f"trajectory {i}: an action token has policy_version < 0"
    return None


def validate(group: TrajectoryGroup, vocab_size: int) -> str | None:
    """Why this group cannot be trained on, or None if it can."""
    checked, problem, _ = check(group, vocab_size)
    return problem if problem is not None else _inspect(checked)


def drop_reason(group: TrajectoryGroup, vocab_size: int, drop_no_signal: bool) -> tuple[str | None, str | None]:
    """(reason, detail) for a group the buffer will not accept, (None, None) otherwise."""
    checked, problem, _ = check(group, vocab_size)
    return why_dropped(checked, problem, drop_no_signal)[:2]


def oldest_version(group: TrajectoryGroup) -> int:
    """The policy version of the oldest action token in the group (validated groups only)."""
    return min(v for t in group.trajectories for v, m in zip(t.policy_versions, t.action_mask) if m)
