"""The explorer's own sampling engine, the adapter it samples with, and restarts in place.

The engine belongs to the explorer alone (rlpipe.sampling.start_engine, not the process's
shared one), so the explorer decides what happens when it dies: the dead engine is shut
down, a new one is started, and the current adapter is loaded into it again from the last
WeightUpdate's bytes (kept for this). At most `max_restarts` times in the life of the
explorer process; the next death fails the role with EngineDeadError saying so.

What restarting cannot fix is raised as Unrecoverable: an engine that cannot start at all
(the first start fails: the model, the settings) and an adapter the engine cannot load.
Every wait is bounded: the engine start (start_timeout_s, enforced by the engine), each
adapter load (load_timeout_s) and each request (request_timeout_s, then it is aborted).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec

from rlpipe.pipeline.config import RunConfig
from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.sampling import EngineDeadError, EngineStartError, SamplingClient
from rlpipe.training import checkpoint
from rlpipe.types import ModelInput, SampleResponse, SamplingParams, WeightUpdate

if TYPE_CHECKING:
    from rlpipe.pipeline.tinker.sampler import TinkerEndpoint

log = logging.getLogger(__name__)

HEALTH_CHECK_S = 1.0  # how often the idle engine is checked for death


class ServingState:
    """What the explorer's engine (ExplorerEngine) and its Tinker endpoint
    (pipeline/tinker/sampler.py: TinkerEndpoint) keep alike, kept once: the adapter being
    sampled with (its WeightUpdate), the restart budget, and the busy time."""

    def __init__(self, name: str, what: str, max_restarts: int, on_restart: Callable[[int], None] | None):
        self.name, self.what = name, what
        self.max_restarts = max_restarts
        self.on_restart = on_restart
        """Called with the restart count each time what serves is replaced (to persist it)."""
        self.restarts = 0
        self.version = -1
        self.incarnation = 0
        self.update: WeightUpdate | None = None
        """The adapter being sampled with, as it came (a restart loads it again)."""
        self.busy = BusyTime()

    def adopt(self, update: WeightUpdate) -> None:
        """Sampling with update's adapter from now on."""
        if self.version < 0:
            self.busy.restart()  # the busy fraction counts from the first adapter
        self.version, self.incarnation, self.update = update.version, update.incarnation, update

    def spend_restart(self, why: str) -> None:
        """One restart of explorer.max_engine_restarts, or EngineDeadError once they are spent."""
        if self.restarts >= self.max_restarts:
            raise EngineDeadError(
                f"{self.name}: {self.what} died ({why}) and was already replaced {self.restarts} time(s), "
                f"the most explorer.max_engine_restarts = {self.max_restarts} allows")
        self.restarts += 1
        log.warning("%s: %s died (%s); replacing it (restart %d of at most %d)", self.name, self.what, why,
                    self.restarts, self.max_restarts)
        if self.on_restart is not None:
            self.on_restart(self.restarts)

    async def sample(self, client, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams) -> SampleResponse:
        if client is None:
            raise EngineDeadError(f"{self.name}: {self.what} is not ready (starting or being replaced)")
        with self.busy:
            return await client.sample_async(prompt, num_samples, sampling_params)


class ExplorerEngine:
    """The explorer's own sampling engine (vLLM or local) and the adapter it samples with,
    restarted in place when it dies. `serving`, the thing a group sees die, is the engine."""

    def __init__(self, model: str, backend: str, options: dict, *, name: str, adapter_dir: Path,
                 start_timeout_s: float, load_timeout_s: float, request_timeout_s: float, max_restarts: int,
                 on_restart: Callable[[int], None] | None = None):
        self.model, self.backend, self.name = model, backend, name
        self.options = dict(options)
        if backend == "vllm":
            self.options["startup_timeout_s"] = start_timeout_s  # the engine enforces it, and cleans up
        self.adapter_dir = Path(adapter_dir)
        self.load_timeout_s, self.request_timeout_s = load_timeout_s, request_timeout_s
        self.state = ServingState(name, "the sampling engine", max_restarts, on_restart)
        self.engine = None
        self.client: SamplingClient | None = None
        """The current adapter's client; None while there is none (before the first adapter,
        during a restart)."""
        self.start_s = 0.0
        self._lock = anyio.Lock()  # one engine start, restart or adapter load at a time
        self._closed = False

    version = property(lambda self: self.state.version)
    incarnation = property(lambda self: self.state.incarnation)
    update = property(lambda self: self.state.update)
    restarts = property(lambda self: self.state.restarts)
    serving = property(lambda self: self.engine)
    ready = property(lambda self: self.client is not None)

    # ------------------------------------------------------------------ engine

    async def start(self) -> None:
        """The first start: an engine that cannot start (the model, the settings) is Unrecoverable."""
        async with self._lock:
            try:
                self.engine = await self._new_engine()
            except (EngineStartError, FileNotFoundError, ValueError) as err:
                raise Unrecoverable(f"{type(err).__name__}: {err}") from err

    async def _new_engine(self):
        from rlpipe.sampling import start_engine

        def start():
            engine = start_engine(self.model, self.backend, **self.options)
            if self._closed:  # the explorer stopped while this engine started: nobody will use it
                engine.shutdown()
                raise EngineDeadError(f"{self.name} stopped while its engine was starting")
            return engine

        start_time = time.monotonic()
        # In one of anyio's worker threads: the start blocks (the vLLM engine bounds it by
        # start_timeout_s). A cancelled explorer does not wait for it: start() shuts down what
        # it started once it sees the explorer closed.
        engine = await anyio.to_thread.run_sync(start, abandon_on_cancel=True)
        self.start_s = time.monotonic() - start_time
        log.info("%s: %s engine for %s ready in %.1f s", self.name, self.backend, self.model, self.start_s)
        return engine

    async def restart(self, dead, why: str) -> None:
        """Replace `dead` (the engine the caller saw die) and reload the current adapter.
        Callers that saw the same death wait here and return once it is replaced."""
        async with self._lock:
            while dead is not None and self.engine is dead and not dead.alive:
                self.state.spend_restart(why)
                self.client = None
                await anyio.to_thread.run_sync(dead.shutdown)
                self.engine = await self._new_engine()
                if self.update is not None:
                    try:
                        await self._load(self.update)
                    except EngineDeadError as err:  # died again at once: counts as another restart
                        dead, why = self.engine, str(err)

    async def watch(self) -> None:
        """Restart the engine when it dies while nothing is sampling (requests notice a death
        themselves). Raises what restart raises."""
        while True:
            await anyio.sleep(HEALTH_CHECK_S)
            engine = self.engine
            if engine is not None and not engine.alive:
                await self.restart(engine, "found dead by the health check")

    def shutdown(self) -> None:
        self._closed = True
        engine, self.engine, self.client = self.engine, None, None
        if engine is not None:
            engine.shutdown()

    # ------------------------------------------------------------------ adapters

    async def load(self, update: WeightUpdate) -> None:
        """Sample with this adapter from now on: requests in flight finish on theirs, or with
        explorer.weight_updates = "inflight" (the engine's mode) go on with this one at their
        next token. A dead
        engine is restarted first, and the adapter loaded into the new one."""
        async with self._lock:
            engine = self.engine
            try:
                return await self._load(update)
            except EngineDeadError as err:
                self.state.update, why = update, str(err)  # what the restart loads
        await self.restart(engine, why)

    async def _load(self, update: WeightUpdate) -> None:
        if not update.adapter_weights:
            raise Unrecoverable(f"{self.name}: WeightUpdate version {update.version} carries no adapter weights"
                                + (f" but the Tinker sampler path {update.sampler_path}: sample it with "
                                   'explorer.sampler = "tinker"' if update.sampler_path else ""))
        engine = self.engine
        engine.check_alive()
        target = self.adapter_dir / f"v{update.version:06d}-i{update.incarnation}"
        checkpoint.write_adapter(target, {checkpoint.ADAPTER_CONFIG: update.adapter_config,
                                          checkpoint.ADAPTER_WEIGHTS: update.adapter_weights})
        try:
            adapter = await anyio.to_thread.run_sync(engine.load_adapter, str(target), update.version,
                                                     self.load_timeout_s, abandon_on_cancel=True)
        except (ValueError, FileNotFoundError) as err:  # the adapter does not fit this engine
            raise Unrecoverable(f"{self.name} cannot load the learner's adapter version {update.version}: {err}") from err
        finally:
            shutil.rmtree(target, ignore_errors=True)  # the engine keeps its own copy of each version
        self.client = SamplingClient(engine, adapter, update.version, self.request_timeout_s)
        self.state.adopt(update)

    # ------------------------------------------------------------------ sampling

    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams,
                           client: SamplingClient | None = None) -> SampleResponse:
        """Sample with the current adapter (or client); timing it gives the busy fraction."""
        return await self.state.sample(client or self.client, prompt, num_samples, sampling_params)


class BusyTime:
    """The fraction of wall time with at least one request in flight: `with busy:` around each."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self._t0, self._since, self._total, self._in_flight = time.monotonic(), 0.0, 0.0, 0

    def __enter__(self):
        if self._in_flight == 0:
            self._since = time.monotonic()
        self._in_flight += 1

    def __exit__(self, *exc):
        self._in_flight -= 1
        if self._in_flight == 0:
            self._total += time.monotonic() - self._since
        return False

    def fraction(self) -> float:
        busy = self._total + (time.monotonic() - self._since if self._in_flight else 0.0)
        return busy / max(time.monotonic() - self._t0, 1e-9)


class GroupClient:
    """The sampling client one group samples through: the explorer's newest adapter at every
    turn (a multi-turn episode picks up new versions), remembering the learner incarnation of
    the group's first turn (the one the group is tagged with) and what served when it started
    (`serving`: the engine, or the Tinker sampling client), to tell whether that died under it."""

    def __init__(self, sampler: ExplorerEngine | TinkerEndpoint):
        self.sampler = sampler
        self.serving = sampler.serving
        self.incarnation: int | None = None

    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams) -> SampleResponse:
        client = self.sampler.client
        if self.incarnation is None and client is not None:
            self.incarnation = self.sampler.incarnation
        return await self.sampler.sample_async(prompt, num_samples, sampling_params, client)

    @property
    def died(self) -> bool:
        return self.serving is not None and not self.serving.alive


# --------------------------------------------------------------------------- engine settings


def engine_options(config: RunConfig, backend: str) -> dict:
    """The sampling engine's options (rlpipe.sampling.start_engine kwargs): [explorer.engine]
    field for field ("" and 0 = the engine's default) with its engine_args spread, and the
    derived max_loaded_adapters and max_lora_rank; cpu_threads is this process's (share_cores)."""
    e = config.explorer.engine
    options = {"max_loaded_adapters": config.max_staleness + 2}
    if config.explorer.weight_updates != "between_requests":  # the engines' default
        options["weight_updates"] = config.explorer.weight_updates
    if backend == "local":
        device = "cuda" if e.device.startswith("cuda") else (e.device or None)  # the first GPU use_device left visible
        return {**options, "max_model_len": e.max_model_len or None, "dtype": e.dtype if e.dtype not in ("", "auto") else None,
                "device": device}
    engine = msgspec.structs.asdict(e)
    del engine["cpu_threads"]
    further = engine.pop("engine_args")
    # max_lora_rank: rounded up to a rank vLLM supports, logged
    return {**options, **engine, **further, "max_lora_rank": e.max_lora_rank or config.learner.rank}


def share_cores(config: RunConfig, explorer_id: str) -> None:
    """The CPU threads of this explorer's engine (explorer.engine.cpu_threads): torch's in this process,
    and VLLM_CPU_OMP_THREADS_BIND for a vLLM engine it starts (unless set already), on cores of
    its own as far as there are enough: explorer-k takes the k-th slice of the cores the
    learner leaves (the upper half; the learner's threads are not bound)."""
    e, count = config.explorer.engine, config.explorer.count
    threads = e.cpu_threads
    on_cpu = e.device == "cpu" or (e.device == "" and not _cuda_available())
    if not threads and (count == 1 or not on_cpu):
        return
    cores = sorted(os.sched_getaffinity(0))
    threads = threads or max(1, len(cores) // 2 // count)
    import torch

    torch.set_num_threads(threads)
    index = int(explorer_id.rpartition("-")[2]) if explorer_id.rpartition("-")[2].isdigit() else 0
    start = len(cores) // 2 + index * threads
    bind = ",".join(str(cores[(start + i) % len(cores)]) for i in range(min(threads, len(cores))))
    if on_cpu and e.tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    log.info("explorer %s: %d CPU threads (vLLM engine cores %s)", explorer_id, threads,
             os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def use_device(device: str) -> None:
    """explorer.engine.device -> CUDA_VISIBLE_DEVICES of this process, which the engine's processes
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
            raise ValueError(f"explorer.engine.device {device!r}: this process sees only GPUs {ids} (CUDA_VISIBLE_DEVICES={current!r})")
        visible = ",".join(ids[i] if ids is not None else str(i) for i in wanted)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("explorer.engine.device %r: CUDA is already initialised in this process; CUDA_VISIBLE_DEVICES "
                    "only applies to the engine's own processes", device)
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    log.info("explorer.engine.device %r: CUDA_VISIBLE_DEVICES=%r", device, visible)
