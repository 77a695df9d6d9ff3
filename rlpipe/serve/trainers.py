"""Training models of `rlpipe serve`: one TrainingClient (a LoRA adapter) per Tinker model id,
all adapters on one base model sharing one SharedBase, each model's requests in its own
queue, run one at a time in seq_id order.

One model's failure is its own: a request that fails finishes its future with the error,
and the queue goes on with the next request; the other models' queues never notice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from rlpipe.serve.futures import Entry, Futures, NotFound, UserError
from rlpipe.serve.registry import Registry
from rlpipe.training.client import TrainingClient
from rlpipe.training.lora import SharedBase
from rlpipe.types import LoraConfig

log = logging.getLogger(__name__)
GAP_WAIT_S = 2.0
"""How long a request waits for a missing lower seq_id before it runs anyway."""


def fail_future(futures: Futures, entry: Entry, error: BaseException) -> None:
    """Finish entry with error, as Tinker categorises it: bad input is "user", the rest "server"."""
    # ValueError: what TrainingClient and the sampler raise for bad input; LookupError: unknown
    # checkpoints; FloatingPointError: a NaN gradient norm (the step is skipped, the client lives).
    if isinstance(error, (UserError, ValueError, LookupError, FileNotFoundError, FloatingPointError)) and not isinstance(error, KeyError):
        futures.finish(entry, error={"error": str(error) or type(error).__name__, "category": "user"})
    else:
        log.error("request %s (%s) failed", entry.request_id, entry.kind, exc_info=error)
        futures.finish(entry, error={"error": f"{type(error).__name__}: {error}", "category": "server"})


async def run_job(futures: Futures, entry: Entry, job: Callable[[], Awaitable]) -> None:
    try:
        futures.finish(entry, await job())
    except asyncio.CancelledError:
        futures.finish(entry, error={"error": "the server is shutting down", "category": "server"})
        raise
    except Exception as e:  # every failure goes to the future; the queue and the server go on
        fail_future(futures, entry, e)


class ModelQueue:
    """One model's requests, one at a time, in seq_id order. The SDK sends request n+1 only
    after request n's submission returned, so gaps are rare (parallel chunks of one
    forward_backward); a request waits at most GAP_WAIT_S for a missing lower seq_id."""

    def __init__(self, model_id: str, futures: Futures):
        self.model_id = model_id
        self.futures = futures
        self.pending: dict[int, tuple[Entry, Callable]] = {}
        self.last_seq: int | None = 0  # a model's first request has seq_id 1
        self.arrived = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"queue {model_id}")
        self.task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the queue of %s stopped", self.model_id, exc_info=task.exception())

    def submit(self, seq_id: int, entry: Entry, job: Callable[[], Awaitable]) -> None:
        self.pending[seq_id] = (entry, job)
        self.arrived.set()

    async def _next(self) -> int:
        gap_since = None
        while True:
            if self.pending:
                seq = min(self.pending)
                if self.last_seq is None or seq <= self.last_seq + 1:
                    return seq
                gap_since = gap_since or time.monotonic()
                left = GAP_WAIT_S - (time.monotonic() - gap_since)
                if left <= 0:
                    log.warning("%s: seq_id %d runs without %d..%d", self.model_id, seq, self.last_seq + 1, seq - 1)
                    return seq
            else:
                gap_since, left = None, None
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                pass

    async def _run(self) -> None:
        while True:
            seq = await self._next()
            entry, job = self.pending.pop(seq)
            self.last_seq = seq if self.last_seq is None else max(seq, self.last_seq)
            await run_job(self.futures, entry, job)

    def close(self) -> None:
        self.task.cancel()
        for entry, _ in self.pending.values():
            self.futures.finish(entry, error={"error": "the model was unloaded", "category": "user"})
        self.pending.clear()


class Trainers:
    def __init__(self, registry: Registry, futures: Futures, bases: dict[str, str], options: dict):
        """bases: served base model name -> local directory. options: TrainingClient options
        (device, dtype, layout, max_tokens_per_micro_batch, gradient_checkpointing, ...)."""
        self.registry = registry
        self.futures = futures
        self.bases = bases
        self.options = dict(options)
        self.shared: dict[str, SharedBase] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.clients: dict[str, TrainingClient] = {}
        self.queues: dict[str, ModelQueue] = {}
        self.session_of: dict[str, str] = {}

    def base_dir(self, name: str) -> str:
        if name in self.bases:
            return self.bases[name]
        real = os.path.realpath(name) if isinstance(name, str) else None
        for directory in self.bases.values():
            if real == os.path.realpath(directory):
                return directory
        raise UserError(f"base model {name!r} is not served here; served: {sorted(self.bases)}")

    async def shared_base(self, base_dir: str) -> SharedBase:
        lock = self._locks.setdefault(base_dir, asyncio.Lock())
        async with lock:
            if base_dir not in self.shared:
                shared_options = {k: self.options[k] for k in ("device", "dtype", "gradient_checkpointing") if k in self.options}
                self.shared[base_dir] = await asyncio.to_thread(SharedBase, base_dir, **shared_options)
            return self.shared[base_dir]

    async def create(self, model_id: str, session_id: str, base_model: str, lora: LoraConfig, user_metadata: dict) -> TrainingClient:
        if model_id in self.clients:  # a retried creation whose first answer was lost
            return self.clients[model_id]
        base_dir = self.base_dir(base_model)
        shared = await self.shared_base(base_dir)
        client_options = {k: v for k, v in self.options.items() if k not in ("device", "dtype", "gradient_checkpointing")}
        client = await asyncio.to_thread(TrainingClient, base_dir, lora, self.registry.model_dir(model_id), shared=shared, **client_options)
        if self.registry.session_finished(session_id):  # it finished while the model loaded
            await asyncio.to_thread(client.close)
            raise UserError(f"session {session_id!r} finished before model {model_id} was ready")
        self.clients[model_id] = client
        self.session_of[model_id] = session_id
        self.registry.add_model(model_id, session_id, base_model, {
            "rank": lora.rank, "seed": lora.seed, "train_mlp": lora.train_mlp, "train_attn": lora.train_attn,
            "train_unembed": lora.train_unembed}, user_metadata)
        return client

    def client(self, model_id: str) -> TrainingClient:
        client = self.clients.get(model_id)
        if client is not None:
            return client
        if self.registry.model(model_id) is not None:
            raise NotFound(f"model {model_id} is no longer loaded (the server restarted or it was unloaded); "
                           "its checkpoints remain: create_training_client_from_state(...) continues from one")
        raise NotFound(f"unknown model_id {model_id!r}")

    def queue(self, model_id: str) -> ModelQueue:
        self.client(model_id)
        if model_id not in self.queues:
            self.queues[model_id] = ModelQueue(model_id, self.futures)
        return self.queues[model_id]

    def submit(self, model_id: str, seq_id: int, kind: str, job: Callable[[], Awaitable]) -> Entry:
        """Queue job for model_id; a retry of the same (model_id, seq_id) gets the first entry."""
        queue = self.queue(model_id)
        entry, fresh = self.futures.new(kind, key=("model", model_id, seq_id))
        if fresh:
            self.registry.touch(model_id)
            queue.submit(seq_id, entry, job)
        return entry

    async def unload_session(self, session_id: str) -> list[str]:
        """Free the live models of a session (its adapters and optimizer state); their
        checkpoints stay. The ids unloaded."""
        gone = [m for m, s in self.session_of.items() if s == session_id]
        for model_id in gone:
            await self.unload(model_id)
        return gone

    async def unload(self, model_id: str) -> None:
        self.session_of.pop(model_id, None)
        queue = self.queues.pop(model_id, None)
        if queue is not None:
            queue.close()
        client = self.clients.pop(model_id, None)
        if client is not None:
            await asyncio.to_thread(client.close)

    async def close(self) -> None:
        for model_id in list(self.clients):
            await self.unload(model_id)
        for shared in self.shared.values():
            await asyncio.to_thread(shared.close)
