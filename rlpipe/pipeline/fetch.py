"""The learner's batches, asked of the buffer on a thread of their own, a step ahead.

The thread owns the learner's request socket to the buffer. The next batch is fetched, and
turned into datums, while the current one trains, so a step does not wait for the buffer's
round trips. A batch is asked for with the version it will be trained at, so the buffer's
staleness check is exact even though the batch is fetched a step early.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rlpipe.pipeline import transport
from rlpipe.pipeline.buffer import STATS_FILE
from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.pipeline.validation import no_signal
from rlpipe.types import Batch, BatchRequest, Datum, Shutdown, TrajectoryGroup

log = logging.getLogger(__name__)

DROP_REASONS = {
    "stale": "sampled more than max_staleness versions before",
    "invalid": "malformed: the buffer's log says why",
    "env_error": "the env raised: the explorer's log says why",
    "no_signal": "every reward of the group equal: buffer.drop_constant_reward_groups",
}
"""The reasons a timed-out learner names, with what each means."""


class BatchFetcher:
    def __init__(self, config, run_id: str, incarnation: int, durable_seq: Callable[[], int],
                 datums: Callable[[list[TrajectoryGroup]], list[list[Datum]]]):
        """durable_seq(): the buffer position of the learner's newest checkpoint, sent with every
        request (the buffer compacts up to it); datums(groups): the batch's mini-batch datums."""
        self.config, self.run_id, self.incarnation = config, run_id, incarnation
        self.durable_seq, self.datums = durable_seq, datums
        self._stop = threading.Event()
        self._no_signal_seen: int | None = None  # the buffer's no_signal count when the last batch was complete
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlpipe-fetch")
        self._requests = self._thread.submit(transport.RequestClient, config.addresses.batches).result()

    def submit(self, after_seq: int, version: int) -> concurrent.futures.Future:
        """A future of (the groups_per_batch groups after after_seq as a Batch, their datums,
        the hunt's figures: hunt_figures), for training at `version`. Asking with after_seq =
        the last seq received so far is safe: the buffer can re-serve anything after the
        checkpoint's position. Fewer groups come when buffer.max_tried_batches was reached
        with buffer.at_max_tried = "train"."""
        return self._thread.submit(self._fetch, after_seq, version)

    def close(self) -> None:
        self._stop.set()
        self._thread.submit(self._requests.close)  # runs once a fetch in progress has seen the stop
        self._thread.shutdown(wait=True)

    def _fetch(self, after_seq: int, version: int) -> tuple[Batch, list[list[Datum]], dict[str, float]]:
        cfg = self.config
        groups, seqs, dropped = [], [], None
        deadline = time.monotonic() + cfg.learner.batch_timeout_s
        # No-signal hunting (DAPO's dynamic sampling), bounded: the groups tried for this batch
        # are those it holds and those the buffer dropped as no_signal since the last batch
        # (its counter is cumulative; a new learner on a run that has begun counts from its
        # first answer).
        bound = cfg.buffer.max_tried_batches * cfg.groups_per_batch
        baseline = self._no_signal_seen if self._no_signal_seen is not None or after_seq > 0 else 0
        hunted = 0
        while len(groups) < cfg.groups_per_batch:
            if bound and groups and hunted + len(groups) >= bound and cfg.buffer.at_max_tried == "train":
                log.warning("batch %d: %d groups tried, %d with no signal: training on the %d with signal "
                            "(buffer.max_tried_batches = %d)", version + 1, hunted + len(groups), hunted, len(groups),
                            cfg.buffer.max_tried_batches)
                break  # train on what there is
            if bound and hunted + len(groups) >= bound and cfg.buffer.at_max_tried == "stop":
                raise Unrecoverable(hunt_message(cfg, version, len(groups), hunted))
            if self._stop.is_set():
                raise RuntimeError("learner stopping")
            if time.monotonic() > deadline:
                raise TimeoutError(timeout_message(cfg, len(groups), dropped))
            request = BatchRequest(sender="learner", learner_version=version,
                                   after_seq=seqs[-1] if seqs else after_seq,
                                   max_groups=cfg.groups_per_batch - len(groups), run_id=self.run_id,
                                   incarnation=self.incarnation, durable_seq=self.durable_seq())
            reply = self._requests.request(request, timeout_s=5.0)
            if isinstance(reply, Shutdown):  # the buffer refuses this learner (another run, a replaced incarnation)
                raise Unrecoverable(f"the buffer at {cfg.addresses.batches} {reply.reason}; this learner is run "
                                    f"{self.run_id!r}, incarnation {self.incarnation}")
            if isinstance(reply, Batch):
                groups += reply.groups
                seqs += reply.seqs
                dropped = reply.dropped
                now = dropped.get("no_signal", 0)
                baseline = now if baseline is None else baseline
                hunted = now - baseline
            if not isinstance(reply, Batch) or not reply.groups:
                time.sleep(0.02)  # nothing yet: ask again shortly
        self._no_signal_seen = baseline + hunted if baseline is not None else None
        batch = Batch(groups=groups, seqs=seqs, dropped=dropped or {})
        return batch, self.datums(groups), hunt_figures(groups, hunted)  # the datums too, off the training thread


def hunt_figures(groups: list[TrajectoryGroup], hunted: int) -> dict[str, float]:
    """The learner's metrics of one batch's hunt: groups tried (those in the batch and the
    no-signal ones dropped meanwhile) and the share that carried no signal (dropped, or in the
    batch with buffer.drop_constant_reward_groups = false)."""
    tried = len(groups) + hunted
    flat = hunted + sum(map(no_signal, groups))
    return {"buffer/tried": float(tried), "buffer/no_signal_frac": flat / tried if tried else 0.0}


def hunt_message(config, version: int, have: int, hunted: int) -> str:
    tried = have + hunted
    return (f"no-signal hunting stopped at buffer.max_tried_batches = {config.buffer.max_tried_batches}: "
            f"{tried} groups tried for batch {version + 1}, {hunted} with every reward equal "
            f"({hunted / max(tried, 1):.0%}), {have}/{config.groups_per_batch} groups with signal. The task is too easy "
            f"or too hard for the model as it is: change the dataset's difficulty or the reward, raise "
            f"buffer.max_tried_batches (0 = no bound), or set buffer.at_max_tried = \"train\" to train on what there is")


def timeout_message(config, have: int, dropped: dict[str, int] | None) -> str:
    """Why no full batch came, as far as the learner can tell: what the buffer has dropped
    (its last answer), and its admission budget's state (run_dir/buffer_stats.json, where the
    buffer runs on this host)."""
    head = (f"no full batch within {config.learner.batch_timeout_s:.0f} s ({have}/{config.groups_per_batch} groups)")
    if dropped is None:
        return f"{head}: the buffer at {config.addresses.batches} never answered: is it running?"
    counts = {reason: dropped.get(reason, 0) for reason in DROP_REASONS} | {r: n for r, n in dropped.items() if n}
    said = ", ".join(f"{n} {reason}" + (f" ({DROP_REASONS[reason]})" if n and reason in DROP_REASONS else "")
                     for reason, n in counts.items())
    return f"{head}: the buffer has dropped {said}; {_admission(config.run_dir)}; are the explorers running?"


def _admission(run_dir: Path) -> str:
    try:
        stats = json.loads((Path(run_dir) / STATS_FILE).read_text()).get("admission")
    except (OSError, ValueError, AttributeError):
        stats = None
    if not isinstance(stats, dict):
        return "the admission budget's state is unknown here (no buffer_stats.json from a buffer on this host)"
    explorers = stats.get("explorers") or {}
    holding = ", ".join(f"{name} holds {e.get('holding', 0)} (adapter version {e.get('version', -1)})"
                        for name, e in explorers.items()) or "no explorer holds credits"
    refused = {k: n for k, n in stats.items() if k not in ("requests", "granted", "expired", "learner", "explorers") and n}
    return (f"admission: {stats.get('granted', 0)} credits granted on {stats.get('requests', 0)} requests"
            + (f", requests that got none: {', '.join(f'{k} {n}' for k, n in refused.items())}" if refused else "")
            + (f", leases expired: {stats['expired']}" if stats.get("expired") else "") + f"; {holding}")
