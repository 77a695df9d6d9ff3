"""The explorer role: explorer.concurrency workers roll out groups against one sampling engine
and commit each finished group to the outbox, which delivers it to the buffer; adapters from
the learner are hot-loaded as they come. (About 430 lines, past the 400 a module keeps to by this
description: the role's delivery, admission, following and concurrency rules, stated once.)

Delivery is at-least-once (rlpipe/pipeline/outbox.py): every finished group, failed ones
too, is committed to run_dir/<explorer id>/outbox.sqlite before it is sent, and sent again
until the buffer acknowledges it (GroupAck); the buffer deduplicates by group id. A buffer
that is down or restarting only delays delivery. An explorer restarted with the same id on
the same run dir sends what its outbox still holds first, and goes on from its dataset
position (the next builder it had not started, kept in the same file).

Admission control keeps the explorers, however many, from running ahead of the learner: one
budget for all of them, kept by the buffer (rlpipe/pipeline/admission.py, where the rule is
derived). The credit line reports what this explorer holds (groups rolling out, or finished
and not yet acknowledged), how many it started, and its adapter version; the buffer answers
how far it may go. A new group starts only while

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
rlpipe/pipeline/tinker/sampler.py). An engine that dies is restarted in place and the current
adapter reloaded (explorer_engine.py, at most explorer.max_engine_restarts times); groups
that were rolling out on it are rolled out again, not delivered as failures.

Concurrency: one anyio task group on the event loop, over zmq.asyncio sockets
(aio_transport.py), and no threads of its own (the engine has its own; its blocking start,
adapter loads and shutdown wait in anyio's worker threads). The tasks: the engine (start, then
health watch), the learner's control channel (adapter loads, Shutdown) and its heartbeats,
the rollout workers, the outbox sender and the credit line (each with its own DEALER to the
buffer). They share state without locks, all on the loop; a worker checks admission and takes
a builder with no await in between, and whatever may let a worker start (an acknowledgement,
a grant, an adapter, a finished group) wakes the waiting ones. anyio rather than
asyncio.TaskGroup: its cancel scopes give each wait its timeout and shield the cleanup, and
it never cancels a task whose awaited future already holds a result, so a timeout loses no
message received.

Failing fast: the first error of any task cancels the others and ends run() with that error
(the others' are logged), so the process exits non-zero at once. What a restart cannot fix
(an adapter the engine cannot load, an engine that cannot start at all) is raised as
Unrecoverable, so a supervisor does not try again. An env that fails only fails its group.
The learner's Shutdown (or SIGTERM) ends the group too, and the outbox gets DRAIN_S more to
deliver before the explorer exits.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import shutil
import time
import uuid

import anyio
import msgspec

from rlpipe.pipeline import aio_transport, identity
from rlpipe.pipeline.admission import CreditLine
from rlpipe.pipeline.buffer import drop_reason, group_versions
from rlpipe.pipeline.config import RunConfig, import_callable, vocab_size
from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.pipeline.explorer_engine import ExplorerEngine, GroupClient, engine_options, share_cores, use_device
from rlpipe.pipeline.outbox import Outbox, OutboxSender
from rlpipe.pipeline.supervised import first_error
from rlpipe.rollouts import do_group
from rlpipe.sampling import EngineDeadError, resolve_backend
from rlpipe.types import CreditRequest, SamplingParams, Shutdown, TrajectoryGroup, WeightUpdate

log = logging.getLogger(__name__)

__all__ = ["Explorer", "engine_options", "use_device"]

DRAIN_S = 5.0  # on Shutdown, how long the outbox may still deliver before the explorer exits
ID_LOCK_WAIT_S = 30.0  # how long a restarted explorer waits for its predecessor to let go of its id
CONTROL_WAIT_S = 1.0  # the control channel's receive timeout (it then waits again)
RECHECK_S = 1.0  # a waiting worker looks again at least this often (a grant expires by the clock)


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
        self.stopping = False
        self.credits: CreditLine | None = None
        """The admission budget's grants to this explorer (made in run())."""
        self.vocab_size = vocab_size(self.model)
        self.stats: dict[str, float] = {"groups_pushed": 0.0, "weight_sync_latency_s": 0.0, "engine_restarts": 0.0}
        self.position = (0, 0)
        """The dataset position of the next builder: (batch index, index in the batch)."""
        self.outbox: Outbox | None = None
        self._changed: anyio.Event | None = None  # set (and replaced) by _notify(); made in run()
        self._other_runs: set[str] = set()
        backend, e = resolve_backend(config.explorer.sampler), config.explorer
        if backend == "tinker":  # no engine here: the official SDK's SamplingClient on the Tinker endpoint
            from rlpipe.pipeline.tinker.sampler import TinkerEndpoint

            self.sampler = TinkerEndpoint(config, name=self.id, request_timeout_s=e.episode_timeout_s,
                                          max_restarts=e.max_engine_restarts, on_restart=self._engine_restarted)
        else:
            self.sampler = ExplorerEngine(
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

    def _notify(self) -> None:
        """Something changed that may let a waiting worker start: wake them to look."""
        if self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

    async def _until(self, predicate) -> None:
        while not predicate():
            with anyio.move_on_after(RECHECK_S):
                await self._changed.wait()

    # ------------------------------------------------------------------ the learner's control channel

    async def _control(self, control: aio_transport.ControlClient, engine_ready: anyio.Event,
                       group: anyio.CancelScope) -> None:
        while True:
            first = await control.recv(CONTROL_WAIT_S)
            if first is None:
                continue
            messages = [first, *control.recv_ready()]  # what came while the last adapter loaded
            # Only the newest adapter matters: skip versions superseded while we were loading.
            target = None
            for m in messages:
                if isinstance(m, WeightUpdate) and self._wanted(m, target):
                    target = m
            if target is not None:
                await self._load(target, engine_ready)
                control.version = self.version
            self._notify()
            shutdown = next((m for m in messages if isinstance(m, Shutdown) and m.run_id in ("", self.run_id)), None)
            if shutdown is not None:
                log.info("%s: shutdown requested (%s)", self.id, shutdown.reason)
                self.stopping = True
                group.cancel()  # groups still rolling out are abandoned: nobody will train them
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

    async def _load(self, update: WeightUpdate, engine_ready: anyio.Event) -> None:
        await engine_ready.wait()  # bounded by the engine's start, whose error ends the task group
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

    # ------------------------------------------------------------------ admission

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
        """What the credit line reports: held groups, and how many more the idle workers
        could start now (0 while the engine is not ready or the explorer stops)."""
        if self.version < 0 or self.outbox is None:
            return None
        e = self.config.explorer
        holding = self.outbox.unacked + self.running
        want = 0 if self.stopping or not self.sampler.ready else min(e.concurrency - self.running, e.max_unacked - holding)
        return CreditRequest(sender=self.id, version=self.version, incarnation=self.incarnation, holding=holding,
                             started=self.started, want=max(0, want),
                             oldest=self.credits.oldest(), run_id=self.run_id)

    def _acked(self, group_id: str, outcome: str) -> None:
        self.stats["groups_pushed"] += 1
        self.stats[f"acked_{outcome}"] = self.stats.get(f"acked_{outcome}", 0.0) + 1
        self.credits.release(group_id)
        self.credits.wake()  # whatever the outcome, the group's credit is free again
        self._notify()  # and a place of max_unacked

    # ------------------------------------------------------------------ rollouts

    async def _rollouts(self) -> None:
        """Wait for the first adapter, then roll out with explorer.concurrency workers until
        stopped; the first worker error ends them all."""
        cfg = self.config
        with anyio.move_on_after(cfg.explorer.first_weights_timeout_s):
            await self._until(lambda: self.version >= 0)
        if self.version < 0:
            raise TimeoutError(f"{self.id}: no adapter from the learner at {cfg.addresses.control} "
                               f"within {cfg.explorer.first_weights_timeout_s:.0f} s")
        builders = self._builders()
        params = SamplingParams(max_tokens=cfg.explorer.max_tokens, temperature=cfg.explorer.temperature)
        async with anyio.create_task_group() as workers:
            for i in range(cfg.explorer.concurrency):
                workers.start_soon(self._worker, builders, params, name=f"rollout-{i}")

    def _builders(self):
        """The dataset's builders from self.position on; self.position always names the next.
        The dataset is made here, at once: a factory that cannot be loaded or fails is an
        error restarting cannot fix, said with the factory's name (not, later, as a generator
        that stopped)."""
        cfg = self.config
        try:
            factory = import_callable(cfg.dataset.factory)
            from transformers import AutoTokenizer

            dataset = factory(AutoTokenizer.from_pretrained(self.model), groups_per_batch=cfg.groups_per_batch, **cfg.dataset.args)
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

    async def _worker(self, builders, params: SamplingParams) -> None:
        while True:
            await self._until(self._may_start)
            # From here to the rollout nothing awaits: no other worker can take the same place.
            try:
                builder = next(builders)
            except StopIteration:  # the generator ended: another worker saw (and raised) why
                raise RuntimeError(f"dataset {self.config.dataset.factory!r} gave no more builders") from None
            # A restart starts at the first builder not started.
            self.outbox.set_state(dataset_batch=self.position[0], dataset_offset=self.position[1])
            self.running += 1
            self.started += 1
            key, version = f"rollout-{self.started}", self.version
            self.credits.hold(key, version, rolling=True)
            try:
                group = await self._roll_out(builder, params)
                reason, detail = drop_reason(group, self.vocab_size, self.config.buffer.drop_constant_reward_groups)
                self.stats[f"groups_{reason or 'useful'}"] = self.stats.get(f"groups_{reason or 'useful'}", 0.0) + 1
                if reason in ("env_error", "invalid"):
                    log.warning("%s: %s group: %s", self.id, reason, detail)
                self.stats["sampler_busy_frac"] = self.sampler.state.busy.fraction()
                self.stats["credits_unused"] = float(self.credits.unused(self.started))
                group = msgspec.structs.replace(group, explorer_stats=dict(self.stats))
                # Until acknowledged (before it can be), at the version it will be trained as.
                trained_as = group_versions(group).version if reason in (None, "no_signal") else version
                self.credits.hold(group.group_id, trained_as)
                self.outbox.put(group)  # durable before it is sent
            finally:
                self.credits.release(key)
                self.running -= 1
                self._notify()
                self.credits.wake()  # a worker is free: report it

    async def _roll_out(self, builder, params: SamplingParams) -> TrajectoryGroup:
        """One group, tagged with the run and the incarnation of its first turn. If the engine
        died under it, the engine is restarted and the builder rolled out again."""
        cfg = self.config
        while True:
            client = GroupClient(self.sampler)
            try:
                group = await do_group(
                    builder, lambda c=client: c, params, episode_timeout_s=cfg.explorer.episode_timeout_s,
                    scale_by_std=cfg.explorer.scale_by_std, max_turns=cfg.explorer.max_turns, explorer_id=self.id,
                )
            except EngineDeadError as err:
                why = str(err)
            else:
                if not (group.failed and client.died):
                    incarnation = client.incarnation if client.incarnation is not None else self.incarnation
                    return msgspec.structs.replace(group, run_id=self.run_id, incarnation=incarnation)
                why = group.error  # e.g. a timeout while the engine lay dead
            self.stats["groups_retried_engine_dead"] = self.stats.get("groups_retried_engine_dead", 0.0) + 1
            await self.sampler.restart(client.serving, why)

    # ------------------------------------------------------------------ the role

    async def _engine(self, ready: anyio.Event) -> None:
        await self.sampler.start()
        ready.set()
        await self.sampler.watch()  # restarts the engine if it dies while nothing samples

    async def run(self) -> None:
        cfg = self.config
        id_lock = await _hold_id(self.dir, self.id)
        failed: BaseException | None = None
        sender = control = None
        try:
            # Adapter files a killed predecessor left between writing and loading them: the engine
            # keeps its own copies, so nothing here is needed any more.
            shutil.rmtree(self.dir / "adapters", ignore_errors=True)
            self.outbox = Outbox(self.dir)
            self.position = (self.outbox.state("dataset_batch"), self.outbox.state("dataset_offset"))
            if self.outbox.unacked or self.position != (0, 0):
                log.info("%s: resuming: %d groups to deliver first, dataset at batch %d + %d", self.id,
                         self.outbox.unacked, *self.position)
            self._changed = anyio.Event()
            self.credits = CreditLine(cfg.addresses.experience, self._credit_request, self._notify,
                                      name=f"{self.id} credit line")
            # Only vLLM moves a running request to new weights; a Tinker in-flight client takes
            # them at its next request, so a long request there still ages and keeps its deadline.
            self.credits.inflight = (cfg.explorer.weight_updates == "inflight"
                                     and resolve_backend(cfg.explorer.sampler) == "vllm")
            sender = OutboxSender(self.outbox, cfg.addresses.experience, ack_timeout_s=cfg.explorer.ack_timeout_s,
                                  on_ack=self._acked, name=f"{self.id} outbox sender")
            self.outbox.on_commit = sender.wake
            control = aio_transport.ControlClient(cfg.addresses.control, self.id)
            engine_ready = anyio.Event()
            try:
                # Ends when the learner says Shutdown, or with the first error of any task.
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._engine, engine_ready, name="engine")
                    tasks.start_soon(self._control, control, engine_ready, tasks.cancel_scope, name="control")
                    tasks.start_soon(control.heartbeats, name="heartbeats")
                    tasks.start_soon(self._rollouts, name="rollouts")
                    tasks.start_soon(sender.run, name="outbox sender")
                    tasks.start_soon(self.credits.run, name="credit line")
            except BaseExceptionGroup as errors:
                failed = first_error(errors)
            if failed is not None:
                raise failed
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled run() still cleans up
                self.stopping = True
                if sender is not None and not isinstance(failed, Exception):
                    await self._drain(sender)
                if control is not None:
                    control.close()
                await anyio.to_thread.run_sync(self.sampler.shutdown)
                if self.outbox is not None:
                    self.dir.mkdir(parents=True, exist_ok=True)
                    stats = {**self.stats, "outbox": self.outbox.stats()}
                    (self.dir / "stats.json").write_text(json.dumps(stats, indent=1))
                    self.outbox.close()
                os.close(id_lock)

    async def _drain(self, sender: OutboxSender) -> None:
        """Give the outbox DRAIN_S more to deliver (the explorer stops without an error)."""
        try:
            with anyio.move_on_after(DRAIN_S):
                async with anyio.create_task_group() as drain:
                    drain.start_soon(sender.run)
                    await self._until(lambda: not self.outbox.unacked)
                    drain.cancel_scope.cancel()
        except Exception as err:  # stopping anyway: what is not delivered stays in the outbox
            log.error("%s: delivering the outbox before stopping failed: %r", self.id, err)
        if self.outbox.unacked:
            log.warning("%s: %d groups not acknowledged by the buffer; they stay in the outbox and are sent when "
                        "an explorer named %s starts again on this run", self.id, self.outbox.unacked, self.id)


async def _hold_id(explorer_dir, name: str) -> int:
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
            await anyio.sleep(0.2)

