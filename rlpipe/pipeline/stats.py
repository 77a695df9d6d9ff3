"""`rlpipe stats RUN_DIR`: one run's accounting, across every restart of every role.

Each figure comes from the durable state of the role that owns it, read without disturbing
a running role: the explorers' outboxes (groups finished, groups not yet acknowledged), the
buffer's store (received, accepted, duplicates, dropped by reason), the learner's newest
checkpoint (steps, groups trained) and the launcher's restarts.json.

The delivery guarantee, as figures: every group an explorer finished is either received by
the buffer (then accepted, or dropped with a reason) or still in its explorer's outbox, to
be sent again. So whenever the run is at rest (finished, stopped or crashed)

    finished == received + waiting          received == accepted + sum(dropped[r] for r != "stale")

and `lost` (finished - received - waiting) is 0. The second holds at every commit (the
buffer's counters change in the transaction that decides a group); while the run goes, the
figures are separate snapshots, so `lost` may show a group or two in flight. "stale" groups were accepted first and then
never trained (too old, from the future, from another learner incarnation: stale_reasons).
"""

from __future__ import annotations

from pathlib import Path

from rlpipe.metrics import read_metrics
from rlpipe.pipeline.launch import read_restarts
from rlpipe.pipeline.learner import latest_checkpoint


def explorer_dirs(run_dir: Path) -> list[Path]:
    from rlpipe.pipeline.outbox import OUTBOX_FILE

    return sorted(p.parent for p in Path(run_dir).glob(f"*/{OUTBOX_FILE}"))


def run_stats(run_dir: str | Path) -> dict:
    from rlpipe.pipeline.outbox import read_outbox_stats, unacked_ids
    from rlpipe.pipeline.store import read_stats, seen_group_ids

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"rlpipe stats: {run_dir} is not a directory")
    buffer_dir = run_dir / "buffer"
    buffer = read_stats(buffer_dir) if buffer_dir.exists() else {"received": 0, "accepted": 0, "duplicates": 0, "dropped": {}}
    explorers: dict[str, dict] = {}
    waiting = 0
    restarts = read_restarts(run_dir)
    for d in explorer_dirs(run_dir):
        own = read_outbox_stats(d)
        # An unacknowledged group may have reached the buffer (the ack was lost): it is
        # received, not waiting; it will come back as a duplicate when re-sent.
        pending = unacked_ids(d)
        unseen = len(pending - seen_group_ids(buffer_dir, pending)) if pending and buffer_dir.exists() else len(pending)
        # With one explorer its role is "explorer" (launch.explorer_role), its directory explorer-0.
        role_restarts = restarts.get(d.name, 0) + (restarts.get("explorer", 0) if d.name == "explorer-0" else 0)
        explorers[d.name] = {**own, "waiting": unseen, "restarts": role_restarts}
        waiting += unseen
    finished = sum(e["finished"] for e in explorers.values())
    latest = latest_checkpoint(run_dir) or {}
    steps = read_metrics(run_dir / "metrics.jsonl")
    received = buffer["received"]
    return {
        "explorers": {"finished": finished, "waiting": waiting, "by_explorer": explorers},
        "buffer": buffer,
        "learner": {"steps": latest.get("step", 0), "groups_trained": latest.get("groups_trained", 0),
                    "incarnation": latest.get("incarnation", 0),
                    # per-token lag (docs/pipeline.md, "Staleness") and no-signal hunting, over the steps logged
                    **lag_figures(steps)},
        # "explorer": every explorer's restarts (roles explorer, or explorer-0, explorer-1, ...); each in by_explorer
        "restarts": {"buffer": restarts.get("buffer", 0), "learner": restarts.get("learner", 0),
                     "explorer": sum(n for r, n in restarts.items() if r == "explorer" or r.startswith("explorer-"))},
        "lost": finished - received - waiting,
        "identity_holds": received == buffer["accepted"] + sum(n for r, n in buffer["dropped"].items() if r != "stale"),
    }


def format_stats(stats: dict) -> str:
    e, b, learner = stats["explorers"], stats["buffer"], stats["learner"]
    dropped = ", ".join(f"{r} {n}" for r, n in sorted(b["dropped"].items())) or "none"
    lines = [
        f"explorers: {e['finished']} groups finished, {e['waiting']} waiting in outboxes",
        f"buffer:    {b['received']} received, {b['accepted']} accepted, {b['duplicates']} duplicates; dropped: {dropped}",
    ]
    if b.get("stale_reasons"):
        lines.append("           stale: " + ", ".join(f"{r} {n}" for r, n in sorted(b["stale_reasons"].items())))
    if b.get("rejected"):
        lines.append("           frames rejected: " + ", ".join(f"{r} {n}" for r, n in sorted(b["rejected"].items())))
    lines += [
        f"learner:   {learner['steps']} steps checkpointed, {learner['groups_trained']} groups trained, "
        f"incarnation {learner['incarnation']}",
        *lag_lines(learner),
        "restarts:  " + ", ".join(f"{r} {n}" for r, n in stats["restarts"].items()),
        f"lost:      {stats['lost']}" + ("" if stats["identity_holds"] else "   (buffer counters do not add up!)"),
    ]
    return "\n".join(lines)


def lag_figures(records: list[dict]) -> dict:
    """Over the learner steps logged: the token-weighted mean lag (the mean of the steps'
    means, each step weighted by its action tokens), the oldest token's lag, and the share of
    groups tried that carried no signal."""
    lagged = [(r["staleness/mean"], r.get("tokens/sampled") or 0.0) for r in records
              if isinstance(r.get("staleness/mean"), (int, float))]
    tokens = sum(n for _, n in lagged)
    hunted = [(r["buffer/no_signal_frac"], r.get("buffer/tried") or 0.0) for r in records
              if isinstance(r.get("buffer/no_signal_frac"), (int, float))]
    tried = sum(n for _, n in hunted)
    out = {}
    if lagged:
        out["lag_mean"] = sum(m * n for m, n in lagged) / tokens if tokens else lagged[-1][0]
        out["lag_max"] = max((r["staleness/max"] for r in records if isinstance(r.get("staleness/max"), (int, float))),
                             default=0.0)
    if hunted:
        out["groups_tried"] = int(tried)
        out["no_signal_frac"] = sum(f * n for f, n in hunted) / tried if tried else 0.0
    return out


def lag_lines(learner: dict) -> list[str]:
    parts = []
    if "lag_mean" in learner:
        parts.append(f"per-token lag mean {learner['lag_mean']:.2f}, oldest token {learner['lag_max']:.0f} versions")
    if "no_signal_frac" in learner:
        parts.append(f"{learner['groups_tried']} groups tried, {learner['no_signal_frac']:.0%} with no signal")
    return ["           " + "; ".join(parts)] if parts else []
