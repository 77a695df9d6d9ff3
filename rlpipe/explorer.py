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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import itertools
import json
import logging
import shutil
import tarfile
import threading
import time
import uuid

import msgspec

from rlpipe import transport
from rlpipe.buffer import drop_reason
from rlpipe.config import RunConfig, import_callable, vocab_size
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

    async def _load(self, update: WeightUpdate) -> None:
        from rlpipe.sampling import create_sampling_client

        target = self.dir / "adapters" / f"v{update.version:06d}"
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(update.adapter_tar)) as tar:
            tar.extractall(target, filter="data")  # refuses absolute paths and links out
        cfg = self.config
        options = {"max_loaded_adapters": cfg.max_staleness + 2}
        backend = None if cfg.explorer.sampler == "auto" else cfg.explorer.sampler
        if (backend or _default_backend()) == "vllm":
            options["max_lora_rank"] = max(cfg.learner.rank, 8)
        client = await asyncio.to_thread(
            create_sampling_client, self.model, model_path=str(target), backend=backend,
            policy_version=update.version, timeout_s=cfg.explorer.episode_timeout_s, **options,
        )
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
        """Owns the DEALER socket (ZeroMQ sockets stay in one thread); hands messages to the loop."""
        control = transport.ControlClient(self.config.addresses.control, self.id)
        try:
            while not self._stop.is_set():
                control.version = self.version
                msg = control.recv(timeout_s=0.5)
                if msg is not None:
                    loop.call_soon_threadsafe(inbox.put_nowait, msg)
        finally:
            control.close()

    async def _handle_control(self, inbox: asyncio.Queue, admitted: asyncio.Condition) -> None:
        while True:
            messages = [await inbox.get()]
            while not inbox.empty():
                messages.append(inbox.get_nowait())
            # Only the newest adapter matters: skip versions superseded while we were loading.
            updates = [m for m in messages if isinstance(m, WeightUpdate) and m.version > self.version]
            if updates:
                await self._load(max(updates, key=lambda m: m.version))
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

    async def run(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        self._sender = await loop.run_in_executor(self._send_pool, transport.Sender, cfg.addresses.experience)
        inbox: asyncio.Queue = asyncio.Queue()
        admitted = asyncio.Condition()
        control = threading.Thread(target=self._control_thread, args=(loop, inbox), daemon=True)
        control.start()
        handler = asyncio.create_task(self._handle_control(inbox, admitted))
        params = SamplingParams(max_tokens=cfg.explorer.max_tokens, temperature=cfg.explorer.temperature,
                                top_p=cfg.explorer.top_p)
        try:
            async with admitted:
                got = await _wait_for(admitted, lambda: self.version >= 0 or self._stop.is_set(),
                                      cfg.explorer.first_weights_timeout_s)
            if not got:
                raise TimeoutError(f"{self.id}: no adapter from the learner at {cfg.addresses.control} "
                                   f"within {cfg.explorer.first_weights_timeout_s:.0f} s")
            builders = self._builders()
            workers = [asyncio.create_task(self._worker(builders, admitted, params)) for _ in range(cfg.explorer.concurrency)]
            # Ends when the learner says Shutdown (in-flight groups are abandoned: nobody
            # will train them) or when a worker fails (a push that timed out).
            done, _ = await asyncio.wait([handler, *workers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()
        finally:
            self._stop.set()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()
            control.join(timeout=5)
            # The push thread is FIFO: close runs after any send still in progress.
            await loop.run_in_executor(self._send_pool, self._sender.close)
            self._send_pool.shutdown(wait=False)
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "stats.json").write_text(json.dumps(self.stats, indent=1))


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
