"""The explorer role: N asyncio tasks roll out groups against one shared sampler and hand each
finished group to the outbox, which delivers it to the buffer; adapters from the learner are
hot-loaded as they come.

Delivery is at-least-once (rlpipe/pipeline/outbox.py): every finished group, failed ones
too, is committed to run_dir/<explorer id>/outbox.sqlite before it is sent, and sent again
until the buffer acknowledges it (GroupAck); the buffer deduplicates by group id. A buffer
that is down or restarting only delays delivery. An explorer restarted with the same id on
the same run dir sends what its outbox still holds first, and goes on from its dataset
position (the next builder it had not started, kept in the same file).

Admission control keeps the explorers, however many, from running ahead of the learner: one
budget for all of them, kept by the buffer (rlpipe/pipeline/admission.py, where the rule is
derived). A CreditLine thread reports what this explorer holds (groups rolling out, or
finished and not yet acknowledged), how many it started, and its adapter version; the buffer
answers how far it may go. A new group starts only while

    started < the granted start_until          (every group can still be trained in time)
    and unacked + running < explorer.max_unacked

The second bound is the back-pressure of a buffer that is away: the outbox never grows past
max_unacked groups (and without the buffer's answers the grant expires too). A group
returned with any outcome gives its credit back: failed and no-signal groups are still
delivered (the buffer counts them) but take no place in a batch, so the explorer rolls out
replacements and a synchronous run never waits for a batch that cannot fill. The buffer's
staleness check stays the guarantee and counts what it drops.

Following the learner: every WeightUpdate names its run and the learner incarnation (learner
starts). An update of a newer incarnation is loaded whatever its version (a restarted learner
resumes from its checkpoint, so versions can repeat or go back), and admission restarts from
its version; within an incarnation only newer versions are loaded. Updates of another run
are ignored (logged once). Each group carries the run id and the incarnation whose adapter
sampled its first turn.

The sampling engine starts as soon as the explorer does, while the learner builds its model
and publishes the first adapter (with explorer.sampler = "tinker" there is no engine: the
explorer samples through the tinker SDK on the sampler path each WeightUpdate names,
rlpipe/pipeline/tinker/backend.py). An engine that dies is restarted in place and the current
adapter reloaded (explorer_sampler.py, at most explorer.max_engine_restarts times); groups
that were rolling out on it are rolled out again, not delivered as failures.

Failing fast: every task of the explorer (engine start and health, control messages and
adapter loads, rollout workers, the outbox sender) is watched by run(); the first error of
any of them ends run() with that error, so the process exits non-zero at once. What a restart
cannot fix (an adapter the engine cannot load, an engine that cannot start at all) is raised
as Unrecoverable, so a supervisor does not try again. An env that fails only fails its group.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import itertools
import json
import logging
import os
import shutil
import threading
import time
import uuid

import msgspec

from rlpipe.pipeline import identity, transport
from rlpipe.pipeline.admission import CreditLine
from rlpipe.pipeline.buffer import drop_reason
from rlpipe.pipeline.config import RunConfig, import_callable, vocab_size
from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.pipeline.explorer_sampler import (
    ExplorerSampler,
    GroupSampler,
    default_backend,
    engine_options,
    share_cores,
    use_device,
)
from rlpipe.pipeline.outbox import Outbox, OutboxSender
from rlpipe.rollouts import do_group
from rlpipe.sampling import EngineDeadError
from rlpipe.types import CreditRequest, SamplingParams, Shutdown, TrajectoryGroup, WeightUpdate

log = logging.getLogger(__name__)

__all__ = ["Explorer", "engine_options", "use_device"]

DRAIN_S = 5.0  # on Shutdown, how long the outbox may still deliver before the explorer exits
ID_LOCK_WAIT_S = 30.0  # how long a restarted explorer waits for its predecessor to let go of its id


class Explorer:
    def __init__(self, config: RunConfig, explorer_id: str | None = None):
        self.config = config
        self.id = explorer_id or f"explorer-{uuid.uuid4().hex[:6]}"
        self.dir = config.run_dir / self.id
        self.model = config.model_path()
        self.run_id = identity.run_id(config.run_dir)
        self.first_version: int | None = None
        """The first version of the current learner incarnation (None before any adapter)."""
        self.running = 0
        self.started = 0
        """Groups started by this process: what the admission budget's grants count against."""
        self.credits: CreditLine | None = None
        """The admission budget's grants to this explorer (made in run())."""
        self.vocab_size = vocab_size(self.model)
        self.stats: dict[str, float] = {"groups_pushed": 0.0, "weight_sync_latency_s": 0.0, "engine_restarts": 0.0}
        self.position = (0, 0)
        """The dataset position of the next builder: (batch index, index in the batch)."""
        self.outbox: Outbox | None = None
        self._stop = threading.Event()
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlpipe-outbox-db")
        self._other_runs: set[str] = set()
        backend = default_backend() if config.explorer.sampler == "auto" else config.explorer.sampler
        e = config.explorer
        if backend == "tinker":  # no engine here: the official SDK's SamplingClient on the Tinker endpoint
            from rlpipe.pipeline.tinker.sampler import TinkerExplorerSampler

            self.sampler = TinkerExplorerSampler(config, name=self.id, request_timeout_s=e.episode_timeout_s,
                                                 max_restarts=e.max_engine_restarts, on_restart=self._engine_restarted)
        else:
            self.sampler = ExplorerSampler(
                self.model, backend, engine_options(config, backend), name=self.id, adapter_dir=self.dir / "adapters",
                start_timeout_s=e.engine_start_timeout_s, load_timeout_s=e.weight_load_timeout_s,
                request_timeout_s=e.episode_timeout_s, max_restarts=e.max_engine_restarts, on_restart=self._engine_restarted)
        use_device(config.explorer.engine.device)  # before anything starts a CUDA context
        share_cores(config, self.id)

    @property
    def version(self) -> int:
        return self.sampler.version

    @property
    def incarnation(self) -> int:
        return self.sampler.incarnation

    def _engine_restarted(self, restarts: int) -> None:
        self.stats["engine_restarts"] = float(restarts)
        self.outbox.count("engine_restarts")

    # ------------------------------------------------------------------ control channel

    def _control_thread(self, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue) -> None:
        """Owns the DEALER socket (ZeroMQ sockets stay in one thread); hands messages to the
        loop, and its own error too (the handler raises it: the role fails, nothing hangs)."""
        try:
            control = transport.ControlClient(self.config.addresses.control, self.id)
            try:
                while not self._stop.is_set():
                    control.version = self.version
                    msg = control.recv(timeout_s=0.5)
                    if msg is not None:
                        loop.call_soon_threadsafe(inbox.put_nowait, msg)
            finally:
                control.close()
        except Exception as err:
            if not loop.is_closed():
                loop.call_soon_threadsafe(inbox.put_nowait, err)

    async def _handle_control(self, inbox: asyncio.Queue, admitted: asyncio.Condition, engine_started: asyncio.Task) -> None:
        while True:
            messages = [await inbox.get()]
            while not inbox.empty():
                messages.append(inbox.get_nowait())
            for m in messages:
                if isinstance(m, Exception):
                    raise RuntimeError(f"{self.id}: the control channel to {self.config.addresses.control} failed: "
                                       f"{type(m).__name__}: {m}") from m
            # Only the newest adapter matters: skip versions superseded while we were loading.
            target = None
            for m in messages:
                if isinstance(m, WeightUpdate) and self._wanted(m, target):
                    target = m
            if target is not None:
                await self._load(target, engine_started)
            shutdown = next((m for m in messages if isinstance(m, Shutdown) and m.run_id in ("", self.run_id)), None)
            if shutdown is not None:
                log.info("%s: shutdown requested (%s)", self.id, shutdown.reason)
                self._stop.set()
            async with admitted:
                admitted.notify_all()
            if shutdown is not None:
                return

    def _wanted(self, update: WeightUpdate, newer_than: WeightUpdate | None) -> bool:
        """Take an update of a newer learner incarnation whatever its version (a restarted
        learner's versions can repeat or go back), a newer version of the same one, nothing
        from a replaced incarnation and nothing from another run."""
        if update.run_id and update.run_id != self.run_id:
            if update.run_id not in self._other_runs:
                self._other_runs.add(update.run_id)
                log.warning("%s: ignoring adapters from run %s (this is run %s): is another run's learner "
                            "at %s?", self.id, update.run_id, self.run_id, self.config.addresses.control)
            self.stats["updates_other_run"] = self.stats.get("updates_other_run", 0.0) + 1
            return False
        current = newer_than or (self.sampler.update if self.version >= 0 else None)
        # A newer incarnation whatever its version; never back to an older (replaced) one.
        return current is None or (update.incarnation, update.version) > (current.incarnation, current.version)

    async def _load(self, update: WeightUpdate, engine_started: asyncio.Task) -> None:
        await engine_started  # raises the engine's start error, if any
        new_incarnation = self.first_version is None or update.incarnation != self.incarnation
        await self.sampler.load(update)
        if new_incarnation:
            # A grant for the old learner says nothing about the new one: ask again.
            self.first_version = update.version
            self.credits.reset()
            log.info("%s: following learner incarnation %d from version %d", self.id, update.incarnation, update.version)
        self.credits.wake()  # a newer adapter may open more of the budget
        self.stats["weight_sync_latency_s"] = time.time() - update.created_at if update.created_at else 0.0
        self.stats["version"] = float(update.version)
        self.stats["incarnation"] = float(update.incarnation)
        log.info("%s: sampling with version %d (sync %.2f s)", self.id, update.version, self.stats["weight_sync_latency_s"])

    # ------------------------------------------------------------------ rollouts

    def _builders(self):
        """The dataset's builders from self.position on; self.position always names the next.
        The dataset is made here, at once: a factory that cannot be loaded or fails is an
        error restarting cannot fix, said with the factory's name (not, later, as a generator
        that stopped)."""
        cfg = self.config
        try:
            factory = import_callable(cfg.dataset.factory)
            dataset = factory(_tokenizer(self.model), groups_per_batch=cfg.groups_per_batch, **cfg.dataset.args)
        except Exception as err:
            raise Unrecoverable(f"dataset.factory {cfg.dataset.factory!r} failed: {type(err).__name__}: {err}") from err
        return self._each_builder(dataset)

    def _each_builder(self, dataset):
        start_batch, start_offset = self.position
        for index in itertools.count(start_batch):
            try:
                batch = dataset.get_batch(index)
            except Exception as err:
                raise RuntimeError(f"dataset {self.config.dataset.factory!r}: get_batch({index}) failed: "
                                   f"{type(err).__name__}: {err}") from err
            for i in range(start_offset if index == start_batch else 0, len(batch)):
                self.position = (index, i + 1) if i + 1 < len(batch) else (index + 1, 0)
                yield batch[i]

    def _may_start(self) -> bool:
        if not self.sampler.ready or self.first_version is None:
            return False
        holding = self.outbox.unacked + self.running
        if holding >= self.config.explorer.max_unacked:
            return False  # the buffer is away or behind: do not grow the outbox further
        if self.started < self.credits.start_until:
            return True
        self.credits.wake()  # wanting more: ask the buffer (at most every admission.ASK_EVERY_S)
        return False

    def _credit_request(self) -> CreditRequest | None:
        """What the credit line reports (on its thread): held groups, and how many more the
        idle workers could start now (0 while the engine is not ready or the explorer stops)."""
        if self.version < 0 or self.outbox is None:
            return None
        e = self.config.explorer
        holding = self.outbox.unacked + self.running
        want = 0 if self._stop.is_set() or not self.sampler.ready else min(e.concurrency - self.running,
                                                                           e.max_unacked - holding)
        return CreditRequest(sender=self.id, version=self.version, incarnation=self.incarnation, holding=holding,
                             started=self.started, want=max(0, want),
                             oldest=self.credits.oldest(), run_id=self.run_id)

    async def _worker(self, builders, admitted: asyncio.Condition, params: SamplingParams) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            async with admitted:
                await admitted.wait_for(lambda: self._may_start() or self._stop.is_set())
                if self._stop.is_set():
                    return
                try:
                    builder = next(builders)
                except StopIteration:  # the generator ended: another worker saw (and raised) why
                    raise RuntimeError(f"dataset {self.config.dataset.factory!r} gave no more builders") from None
                # Queued in order on the outbox thread: a restart starts at the first builder not started.
                saved = loop.run_in_executor(self._db, lambda p=self.position: self.outbox.set_state(
                    dataset_batch=p[0], dataset_offset=p[1]))
                self.running += 1
                self.started += 1
                key, version = f"rollout-{self.started}", self.version
                self.credits.hold(key, version)
            try:
                await saved
                group = await self._roll_out(builder, params)
                reason, detail = drop_reason(group, self.vocab_size, self.config.buffer.drop_constant_reward_groups)
                self.stats[f"groups_{reason or 'useful'}"] = self.stats.get(f"groups_{reason or 'useful'}", 0.0) + 1
                if reason in ("env_error", "invalid"):
                    log.warning("%s: %s group: %s", self.id, reason, detail)
                self.stats["sampler_busy_frac"] = self.sampler.busy_frac()
                self.stats["credits_unused"] = float(self.credits.unused(self.started))
                group = msgspec.structs.replace(group, explorer_stats=dict(self.stats))
                self.credits.hold(group.group_id, version)  # until acknowledged (before it can be)
                await loop.run_in_executor(self._db, self.outbox.put, group)  # durable before it is sent
            finally:
                self.credits.release(key)
                async with admitted:
                    self.running -= 1
                    admitted.notify_all()
                self.credits.wake()  # a worker is free: report it

    async def _roll_out(self, builder, params: SamplingParams) -> TrajectoryGroup:
        """One group, tagged with the run and the incarnation of its first turn. If the engine
        died under it, the engine is restarted and the builder rolled out again."""
        cfg = self.config
        while True:
            sampler = GroupSampler(self.sampler)
            try:
                group = await do_group(
                    builder, lambda s=sampler: s, params, episode_timeout_s=cfg.explorer.episode_timeout_s,
                    scale_by_std=cfg.explorer.scale_by_std, max_turns=cfg.explorer.max_turns, explorer_id=self.id,
                )
            except EngineDeadError as err:
                why = str(err)
            else:
                if not (group.failed and sampler.engine is not None and not sampler.engine.alive):
                    incarnation = sampler.incarnation if sampler.incarnation is not None else self.incarnation
                    return msgspec.structs.replace(group, run_id=self.run_id, incarnation=incarnation)
                why = group.error  # e.g. a timeout while the engine lay dead
            self.stats["groups_retried_engine_dead"] = self.stats.get("groups_retried_engine_dead", 0.0) + 1
            await self.sampler.restart(sampler.engine, why)

    async def _rollouts(self, admitted: asyncio.Condition) -> None:
        """Wait for the first adapter, then roll out with explorer.concurrency workers until
        stopped; the first worker error ends it."""
        cfg = self.config
        async with admitted:
            got = await _wait_for(admitted, lambda: self.version >= 0 or self._stop.is_set(),
                                  cfg.explorer.first_weights_timeout_s)
        if not got:
            raise TimeoutError(f"{self.id}: no adapter from the learner at {cfg.addresses.control} "
                               f"within {cfg.explorer.first_weights_timeout_s:.0f} s")
        builders = self._builders()
        params = SamplingParams(max_tokens=cfg.explorer.max_tokens, temperature=cfg.explorer.temperature)
        workers = [asyncio.create_task(self._worker(builders, admitted, params), name=f"rollout-{i}")
                   for i in range(cfg.explorer.concurrency)]
        done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()

    # ------------------------------------------------------------------ the role

    async def _watch_thread(self, thread: OutboxSender | CreditLine, what: str) -> None:
        while thread.alive:
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.id}: the {what} stopped: {thread.error!r}") from thread.error

    async def run(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        id_lock = await asyncio.to_thread(_hold_id, self.dir, self.id)
        # Adapter files a killed predecessor left between writing and loading them: the engine
        # keeps its own copies, so nothing here is needed any more.
        shutil.rmtree(self.dir / "adapters", ignore_errors=True)
        self.outbox = await loop.run_in_executor(self._db, Outbox, self.dir)
        self.position = (self.outbox.state("dataset_batch"), self.outbox.state("dataset_offset"))
        if self.outbox.unacked or self.position != (0, 0):
            log.info("%s: resuming: %d groups to deliver first, dataset at batch %d + %d", self.id,
                     self.outbox.unacked, *self.position)
        admitted = asyncio.Condition()

        async def notify():
            async with admitted:
                admitted.notify_all()

        def acked(group_id: str, outcome: str) -> None:  # in the sender thread
            def on_loop():
                self.stats["groups_pushed"] += 1
                self.stats[f"acked_{outcome}"] = self.stats.get(f"acked_{outcome}", 0.0) + 1
                asyncio.ensure_future(notify())  # a slot of max_unacked is free again
            self.credits.release(group_id)
            self.credits.wake()  # whatever the outcome, the group's credit is free again
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_loop)

        def granted() -> None:  # in the credit thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(notify()))

        self.credits = CreditLine(cfg.addresses.experience, self._credit_request, granted,
                                  name=f"rlpipe-credits-{self.id}").start()
        sender = OutboxSender(self.outbox, cfg.addresses.experience, ack_timeout_s=cfg.explorer.ack_timeout_s,
                              on_ack=acked, name=f"rlpipe-outbox-{self.id}").start()
        self.outbox.on_commit = sender.wake
        inbox: asyncio.Queue = asyncio.Queue()
        control = threading.Thread(target=self._control_thread, args=(loop, inbox), name="rlpipe-control", daemon=True)
        control.start()
        engine = asyncio.create_task(self.sampler.start(), name="engine start")
        handler = asyncio.create_task(self._handle_control(inbox, admitted, engine), name="control")
        rollouts = asyncio.create_task(self._rollouts(admitted), name="rollouts")
        # Restarts the engine if it dies while nothing samples; raises past max_engine_restarts.
        health = asyncio.create_task(_after(engine, self.sampler.watch), name="engine health")
        delivery = asyncio.create_task(self._watch_thread(sender, "outbox sender"), name="outbox sender")
        credit = asyncio.create_task(self._watch_thread(self.credits, "credit line"), name="credit line")
        error: BaseException | None = None
        try:
            # Ends when the learner says Shutdown (groups still rolling out are abandoned:
            # nobody will train them), or with the first error of any task, raised here.
            pending = {engine, handler, rollouts, health, delivery, credit}
            while handler in pending and rollouts in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        error = task.exception()
                        raise error
        finally:
            self._stop.set()
            await _cancel_and_reap(asyncio.all_tasks() - {asyncio.current_task()}, error)
            control.join(timeout=5)
            if error is None and not await asyncio.to_thread(sender.drain, DRAIN_S):
                log.warning("%s: %d groups not acknowledged by the buffer; they stay in the outbox and are "
                            "sent when an explorer named %s starts again on this run", self.id, self.outbox.unacked, self.id)
            await asyncio.to_thread(sender.stop)
            await asyncio.to_thread(self.credits.stop)
            await asyncio.to_thread(self.sampler.shutdown)
            self.dir.mkdir(parents=True, exist_ok=True)
            outbox_stats = await loop.run_in_executor(self._db, self.outbox.stats)
            (self.dir / "stats.json").write_text(json.dumps({**self.stats, "outbox": outbox_stats}, indent=1))
            await loop.run_in_executor(self._db, self.outbox.close)
            self._db.shutdown(wait=False)
            os.close(id_lock)


async def _after(first: asyncio.Task, then) -> None:
    await first
    await then()


def _hold_id(explorer_dir, name: str) -> int:
    """One explorer per id and run: an exclusive lock on explorer_dir/lock, held for the
    process's life. A POSIX lock: released when the process dies, even by SIGKILL, and not
    inherited by the engine's processes. Waits a little for a predecessor that is exiting."""
    explorer_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(explorer_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + ID_LOCK_WAIT_S
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise Unrecoverable(f"another explorer named {name} is running on {explorer_dir.parent} "
                                    f"(give each explorer its own --id)") from None
            time.sleep(0.2)


async def _cancel_and_reap(tasks: set[asyncio.Task], raised: BaseException | None, timeout_s: float = 10.0) -> None:
    """Cancel tasks and wait for them; an error one of them ended with (other than the one
    being raised) is logged, not lost."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in done:
        if not task.cancelled() and task.exception() is not None and task.exception() is not raised:
            error = task.exception()
            log.error("task %s also failed: %s: %s", task.get_name(), type(error).__name__, error)
    for task in pending:
        log.warning("task %s did not stop within %.0f s of being cancelled", task.get_name(), timeout_s)


async def _wait_for(condition: asyncio.Condition, predicate, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(condition.wait_for(predicate), timeout_s)
        return True
    except asyncio.TimeoutError:
        return False


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)
