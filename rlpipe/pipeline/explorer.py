"""The explorer role: N asyncio tasks roll out groups against one shared sampler and push
each finished group to the buffer; adapters from the learner are hot-loaded as they come.

Admission control keeps the explorer from running ahead of the learner. Counting from the
first adapter version v0 it received, batches are trained in order, so the k-th useful group
(one the buffer will accept) lands in batch k // groups_per_batch, trained at learner
version v0 + k // groups_per_batch. Sampled now with version v, its staleness will be
v0 + k // groups_per_batch - v. A new group therefore starts only while

    useful + running < (v - v0 + max_staleness + 1) * groups_per_batch

Failed and no-signal groups are still pushed (the buffer counts them) but do not use up a
slot, so the explorer rolls out replacements and a synchronous run never waits for a batch
that cannot fill. With several explorers each counts alone; the buffer's staleness check
stays the guarantee and counts what it drops.

The sampling engine starts as soon as the explorer does, while the learner builds its model
and publishes the first adapter (both take seconds; one after the other they added up).

Failing fast: every task of the explorer (engine start, control messages and adapter loads,
rollout workers) is watched by run(); the first error of any of them ends run() with that
error, so the process exits non-zero at once (`rlpipe run` then stops the other roles and
prints it). An adapter the engine cannot load, an engine that will not start or that died
(every group would fail) are such errors; an env that fails only fails its group (counted).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid

import msgspec

from rlpipe import checkpoint
from rlpipe.pipeline import transport
from rlpipe.pipeline.buffer import drop_reason
from rlpipe.pipeline.config import RunConfig, import_callable, vocab_size
from rlpipe.rollouts import do_group
from rlpipe.types import SamplingParams, Shutdown, TrajectoryGroup, WeightUpdate

log = logging.getLogger(__name__)


class Explorer:
    def __init__(self, config: RunConfig, explorer_id: str | None = None):
        self.config = config
        self.id = explorer_id or f"explorer-{uuid.uuid4().hex[:6]}"
        self.dir = config.run_dir / self.id
        self.model = config.model_path()
        self.sampler = None
        self.version = -1
        self.first_version: int | None = None
        self.running = 0
        self.useful = 0
        self.vocab_size = vocab_size(self.model)
        self.stats = {"groups_pushed": 0.0, "weight_sync_latency_s": 0.0}
        self._busy_since: float | None = None
        self._busy_total = 0.0
        self._in_flight = 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._send_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlpipe-push")
        self._sender: transport.Sender | None = None
        self.backend = _default_backend() if config.explorer.sampler == "auto" else config.explorer.sampler
        self.engine_options = engine_options(config, self.backend)
        self.engine = None
        use_device(config.explorer.device)  # before anything starts a CUDA context

    # ------------------------------------------------------------------ sampler side

    def current_sampler(self):
        return self

    async def sample_async(self, prompt, num_samples, sampling_params):
        """Every turn goes to the newest loaded version; timing it gives the busy fraction."""
        client = self.sampler
        if self._in_flight == 0:
            self._busy_since = time.monotonic()
        self._in_flight += 1
        try:
            return await client.sample_async(prompt, num_samples, sampling_params)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._busy_total += time.monotonic() - self._busy_since

    def _sampler_busy_frac(self) -> float:
        busy = self._busy_total + (time.monotonic() - self._busy_since if self._in_flight else 0.0)
        return busy / max(time.monotonic() - self._t0, 1e-9)

    async def _start_engine(self) -> None:
        from rlpipe.sampling import get_engine

        start = time.monotonic()
        self.engine = await asyncio.to_thread(get_engine, self.model, self.backend, **self.engine_options)
        self.stats["engine_start_s"] = time.monotonic() - start
        log.info("%s: %s engine for %s ready in %.1f s", self.id, self.backend, self.model, self.stats["engine_start_s"])

    async def _load(self, update: WeightUpdate, engine_started: asyncio.Task) -> None:
        from rlpipe.sampling import create_sampling_client

        await engine_started  # raises the engine's start error, if any
        self.engine.check_alive()  # a dead engine fails the role (get_engine would quietly start another)
        target = self.dir / "adapters" / f"v{update.version:06d}"
        checkpoint.write_adapter(target, {checkpoint.ADAPTER_CONFIG: update.adapter_config,
                                          checkpoint.ADAPTER_WEIGHTS: update.adapter_weights})
        try:
            client = await asyncio.to_thread(
                create_sampling_client, self.model, model_path=str(target), backend=self.backend,
                policy_version=update.version, timeout_s=self.config.explorer.episode_timeout_s, **self.engine_options,
            )
        except (ValueError, FileNotFoundError) as err:  # the adapter does not fit this engine: unrecoverable
            raise ValueError(f"{self.id} cannot load the learner's adapter version {update.version}: {err}") from err
        shutil.rmtree(target, ignore_errors=True)  # the engine keeps its own copy of each version
        self.sampler, self.version = client, update.version
        if self.first_version is None:
            self.first_version = update.version
            self._t0 = time.monotonic()  # busy fraction counts from the first adapter, not engine start
        self.stats["weight_sync_latency_s"] = time.time() - update.created_at if update.created_at else 0.0
        self.stats["version"] = float(update.version)
        log.info("%s: sampling with version %d (sync %.2f s)", self.id, update.version, self.stats["weight_sync_latency_s"])

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
            updates = [m for m in messages if isinstance(m, WeightUpdate) and m.version > self.version]
            if updates:
                await self._load(max(updates, key=lambda m: m.version), engine_started)
            shutdown = next((m for m in messages if isinstance(m, Shutdown)), None)
            if shutdown is not None:
                log.info("%s: shutdown requested (%s)", self.id, shutdown.reason)
                self._stop.set()
            async with admitted:
                admitted.notify_all()
            if shutdown is not None:
                return

    # ------------------------------------------------------------------ rollouts

    def _builders(self):
        cfg = self.config
        tokenizer = _tokenizer(self.model)
        dataset = import_callable(cfg.dataset.factory)(tokenizer, groups_per_batch=cfg.groups_per_batch, **cfg.dataset.args)
        for index in itertools.count():
            yield from dataset.get_batch(index)

    def _may_start(self) -> bool:
        if self.version < 0:
            return False
        window = self.version - self.first_version + self.config.max_staleness + 1
        return self.useful + self.running < window * self.config.groups_per_batch

    async def _worker(self, builders, admitted: asyncio.Condition, params: SamplingParams) -> None:
        cfg = self.config
        while not self._stop.is_set():
            async with admitted:
                await admitted.wait_for(lambda: self._may_start() or self._stop.is_set())
                if self._stop.is_set():
                    return
                builder = next(builders)
                self.running += 1
            reason = "unfinished"
            try:
                group = await do_group(
                    builder, self.current_sampler, params, episode_timeout_s=cfg.explorer.episode_timeout_s,
                    scale_by_std=cfg.explorer.scale_by_std, max_turns=cfg.explorer.max_turns, explorer_id=self.id,
                )
                reason, detail = drop_reason(group, self.vocab_size, cfg.buffer.drop_constant_reward_groups)
                self.stats[f"groups_{reason or 'useful'}"] = self.stats.get(f"groups_{reason or 'useful'}", 0.0) + 1
                if reason in ("env_error", "invalid"):
                    log.warning("%s: %s group: %s", self.id, reason, detail)
                await self._push(group)
                if group.failed:
                    self.engine.check_alive()  # a dead engine would fail every group: fail the role instead
            finally:
                async with admitted:
                    self.running -= 1
                    self.useful += reason is None
                    admitted.notify_all()  # a dropped group frees its slot

    async def _push(self, group: TrajectoryGroup) -> None:
        self.stats["sampler_busy_frac"] = self._sampler_busy_frac()
        self.stats["groups_useful_or_running"] = float(self.useful + self.running)
        group = msgspec.structs.replace(group, explorer_stats=dict(self.stats))
        await asyncio.get_running_loop().run_in_executor(self._send_pool, self._send, group)

    def _send(self, group: TrajectoryGroup) -> None:
        self._sender.send(group, self.config.explorer.push_timeout_s)
        # Counted here, in the push thread: a send that completes after its awaiting task was
        # cancelled (at shutdown) still counts, so pushed == what the buffer received.
        self.stats["groups_pushed"] += 1

    async def _rollouts(self, admitted: asyncio.Condition) -> None:
        """Wait for the first adapter, then roll out with explorer.concurrency workers until
        stopped; the first worker error (a push that timed out, a dead engine) ends it."""
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

    async def run(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        self._sender = await loop.run_in_executor(self._send_pool, transport.Sender, cfg.addresses.experience)
        inbox: asyncio.Queue = asyncio.Queue()
        admitted = asyncio.Condition()
        control = threading.Thread(target=self._control_thread, args=(loop, inbox), name="rlpipe-control", daemon=True)
        control.start()
        engine = asyncio.create_task(self._start_engine(), name="engine start")
        handler = asyncio.create_task(self._handle_control(inbox, admitted, engine), name="control")
        rollouts = asyncio.create_task(self._rollouts(admitted), name="rollouts")
        error: BaseException | None = None
        try:
            # Ends when the learner says Shutdown (in-flight groups are abandoned: nobody will
            # train them), or with the first error of any task, raised here.
            pending = {engine, handler, rollouts}
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
            # The push thread is FIFO: close runs after any send still in progress.
            await loop.run_in_executor(self._send_pool, self._sender.close)
            self._send_pool.shutdown(wait=False)
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "stats.json").write_text(json.dumps(self.stats, indent=1))


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


def _default_backend() -> str:
    from rlpipe.sampling import default_backend

    return default_backend()


def engine_options(config: RunConfig, backend: str) -> dict:
    """The sampling engine's options from the run config (rlpipe.sampling.get_engine kwargs)."""
    e = config.explorer
    options = {"max_loaded_adapters": config.max_staleness + 2}
    if backend == "local":
        device = "cuda" if e.device.startswith("cuda") else (e.device or None)  # the first GPU use_device left visible
        return {**options, "max_model_len": e.max_model_len or None, "dtype": e.dtype if e.dtype not in ("", "auto") else None,
                "device": device}
    return {
        **options,
        "max_lora_rank": e.max_lora_rank or config.learner.rank,  # rounded up to a rank vLLM supports, logged
        "max_model_len": e.max_model_len or None, "dtype": e.dtype or None, "enforce_eager": e.enforce_eager,
        "gpu_memory_utilization": e.gpu_memory_utilization or None, "tensor_parallel_size": e.tensor_parallel_size,
        "device": e.device, **e.engine_args,
    }


def use_device(device: str) -> None:
    """explorer.device -> CUDA_VISIBLE_DEVICES of this process, which the engine's processes
    inherit. GPU numbers count among the GPUs this process was started with."""
    if device in ("", "cuda"):
        return
    if device == "cpu":
        visible = ""
    else:
        wanted = [int(i) for i in device.partition(":")[2].split(",")]
        current = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [i.strip() for i in current.split(",") if i.strip()] if current is not None else None
        if ids is not None and max(wanted) >= len(ids):
            raise ValueError(f"explorer.device {device!r}: this process sees only GPUs {ids} (CUDA_VISIBLE_DEVICES={current!r})")
        visible = ",".join(ids[i] if ids is not None else str(i) for i in wanted)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("explorer.device %r: CUDA is already initialised in this process; CUDA_VISIBLE_DEVICES "
                    "only applies to the engine's own processes", device)
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    log.info("explorer.device %r: CUDA_VISIBLE_DEVICES=%r", device, visible)
