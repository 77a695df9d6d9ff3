"""The vLLM backend: one AsyncLLM per base model per process, LoRA versions hot-swapped.
(Past 400 lines: one class, the engine, whose parts share its loop, locks and adapter state;
the in-flight update mechanism is in inflight.py.)

AsyncLLM is bound to the event loop it runs on, so each engine owns a background thread
running its own loop. Sync callers submit coroutines with run_coroutine_threadsafe and get
a concurrent future; async callers (the explorer's loop, pytest-asyncio) await that future
through asyncio.wrap_future. Nothing here depends on the caller having a loop.

Policy versions: every `load_adapter` registers the adapter under a NEW LoRA int id and
name, from an engine-owned snapshot of its directory. A request carries the LoRARequest of
the version it started with, so requests running when v+1 loads finish on v. The
AdapterTable keeps the newest `max_loaded_adapters` versions and evicts older idle ones
(remove_lora), never one with requests in flight.

In-flight updates (weight_updates="inflight", the explorer's explorer.weight_updates): every
adapter request runs on one live LoRA slot whose weights each load replaces under the
running requests, which carry on at their next token; each token keeps the version that
sampled it (SampledSequence.policy_versions). How, and why the KV is recomputed, is in
inflight.py.

Prefix cache and LoRA: vLLM hashes every KV block together with the request's LoRA name and
path (vllm/v1/core/kv_cache_utils.py `_gen_lora_extra_hash_keys`); base-model requests have
no LoRA key (or, on CPU, the zero adapter's own, see _zero_adapter). Since each loaded
version has a unique name and a unique snapshot path, a block computed under one version
can never serve another (tests/test_sampling_vllm.py::test_prefix_cache_is_per_adapter).

Logprobs: the engine runs with logprobs_mode="processed_logprobs", so a sampled token's
logprob is log_softmax of the logits after temperature, top_k and top_p — the distribution
it was actually drawn from. logprobs=0 returns exactly the sampled token's entry, which we
read by token id. (Greedy, temperature 0: log_softmax of the raw logits.)

Start: the engine's settings and their checks are in vllm_args.py. An engine counts as
started once it has served one request, so a model it cannot run fails here, as an
EngineStartError naming the model, never in the first rollout; startup_timeout_s bounds the
start and that request together. Work nobody awaits (adapter removals, requests still ending
after an abort) logs its error when it fails.

Cancellation: a caller that stops waiting (SamplingClient.sample_async's task cancelled, e.g.
an episode that timed out) cancels the request's future; that cancels its task on the engine
loop, and generate() aborts the request in vLLM (front end and engine core), so it stops
decoding at once (tests/test_sampling_vllm.py::test_cancelled_request_is_aborted_in_the_engine).

(About 410 lines, over the 400 a module keeps to: the engine's loop thread, its adapter slots
and its requests are one piece of state; the settings and adapter files are already apart.)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from rlpipe.sampling.adapters import Adapter, AdapterTable, base_weight_shapes, snapshot_adapter, write_zero_adapter
from rlpipe.sampling.client import Request
from rlpipe.sampling.prompt_logprob_lock import PromptLogprobLock
from rlpipe.sampling.inflight import LiveAdapter, check_mode, token_versions
from rlpipe.sampling.loop import LoopThread, environ, log_failure
from rlpipe.sampling.errors import EngineDeadError, EngineStartError, SamplingError, SamplingTimeout
from rlpipe.sampling.vllm_args import engine_config, engine_process_env
from rlpipe.types import SampledSequence, SampleResponse

log = logging.getLogger(__name__)

HEALTH_POLL_S = 0.5  # how often a waiting request checks that the engine core is alive


class VLLMEngine:
    def __init__(
        self,
        base_model: str,
        *,
        max_loaded_adapters: int = 4,
        max_lora_rank: int = 32,
        startup_timeout_s: float = 900.0,
        weight_updates: str = "between_requests",
        inflight_recompute_kv: bool = True,
        **options,
    ):
        """max_loaded_adapters: adapter versions kept loaded (>= max_staleness + 1), also
        the number vLLM may batch together. max_lora_rank: rounded up to a rank vLLM
        supports. options: vllm_args.engine_config's (max_model_len, dtype: default float32
        on CPU for exact logprobs, "auto" elsewhere; enforce_eager: default True, no
        torch.compile (fast start; on CPU compiled graphs also recompile per LoRA set);
        enable_prefix_caching, kv_cache_memory_bytes, gpu_memory_utilization,
        tensor_parallel_size, device), and further vllm.AsyncEngineArgs fields.
        weight_updates: "between_requests" (each request finishes on the version it started
        with) or "inflight" (one live adapter, replaced under running requests: inflight.py).
        inflight_recompute_kv: in-flight updates recompute the running requests' KV under the
        new weights (True; False keeps the old KV, for measuring, see inflight.py).
        Raises EngineStartError naming the model and the reason if the engine cannot start
        or cannot serve its first request."""
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.monotonic()
        if not (Path(base_model) / "config.json").is_file():
            raise FileNotFoundError(f"base_model {base_model!r} is not a local Hugging Face model directory (no config.json)")
        self.base_model = str(base_model)
        self.table = AdapterTable(max_loaded_adapters)
        self.weight_updates = check_mode(weight_updates)
        self.base_shapes = base_weight_shapes(self.base_model)
        self.options = dict(max_loaded_adapters=max_loaded_adapters, max_lora_rank=max_lora_rank,
                            weight_updates=weight_updates, **options)
        config = engine_config(self.base_model, max_loaded_adapters=max_loaded_adapters, max_lora_rank=max_lora_rank, **options)
        on_cpu = config.device_config.device_type == "cpu"
        if weight_updates == "inflight" and on_cpu and "enable_chunked_prefill" not in options:
            # An update re-prefills every running request at once; chunked, a seeded one's prefill
            # makes vLLM 0.32 rewind its CPU torch.Generator, which CPU generators cannot do
            # ("CPU Generator does not use offset", the engine dies). Whole prefills only.
            batched = max(config.model_config.max_model_len, config.scheduler_config.max_num_batched_tokens)
            config = engine_config(self.base_model, max_loaded_adapters=max_loaded_adapters, max_lora_rank=max_lora_rank,
                                   enable_chunked_prefill=False, max_num_batched_tokens=batched, **options)
        self.max_lora_rank = config.lora_config.max_lora_rank
        self._ids = itertools.count(1)
        self._live = (LiveAdapter(next(self._ids), max_loaded_adapters, inflight_recompute_kv)
                      if weight_updates == "inflight" else None)
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="rlpipe-vllm-adapters-"))
        self._loop = LoopThread(f"rlpipe-vllm-{Path(base_model).name}")
        self._closed = False
        self.llm = None
        self.stats: collections.Counter = collections.Counter()  # requests, prompt / cached / generated tokens

        async def start():  # AsyncLLM binds its output handler to the loop it is created on
            with environ(engine_process_env(config)):  # the engine process inherits it
                return AsyncLLM.from_vllm_config(config, disable_log_stats=True)

        deadline = started + startup_timeout_s  # one bound for the start and the first request
        try:
            self.llm = self._loop.submit(start()).result(max(0.0, deadline - time.monotonic()))
            # The first request is where a model the engine cannot run shows (on CPU the
            # engine starts without running the model): find out now, not in the first rollout.
            self._loop.submit(self._first_request()).result(max(0.0, deadline - time.monotonic()))
        except BaseException as e:
            self.shutdown()
            if isinstance(e, concurrent.futures.TimeoutError):
                raise EngineStartError(f"the vLLM engine for {base_model} did not start within {startup_timeout_s:g} s") from e
            if isinstance(e, Exception) and not isinstance(e, EngineStartError):
                raise EngineStartError(
                    f"vLLM could not start an engine for {base_model}: {type(e).__name__}: {e} "
                    "(the engine process logs its own traceback above)"
                ) from e
            raise
        self.vocab_size = self.llm.model_config.get_vocab_size()
        self.max_model_len = self.llm.model_config.max_model_len
        kv = config.cache_config.kv_cache_memory_bytes
        log.info("vLLM engine for %s started in %.1f s: max_model_len %d, max_lora_rank %d, dtype %s, "
                 "tensor_parallel_size %d, KV cache %s, %s executor, weight updates %s", base_model, time.monotonic() - started,
                 self.max_model_len, self.max_lora_rank, str(config.model_config.dtype).removeprefix("torch."),
                 config.parallel_config.tensor_parallel_size,
                 f"{kv / (1 << 20):.0f} MiB" if kv else f"{config.cache_config.gpu_memory_utilization:g} of the device",
                 config.parallel_config.distributed_executor_backend, self.weight_updates)
        # vLLM CPU LoRA index bug workaround, see _zero_adapter
        self._lora_index_bug = on_cpu
        self._max_loras = max_loaded_adapters + on_cpu
        self._base_lora = None  # the zero adapter, once base requests must run under it
        self._plain_base = 0  # base requests in flight without any LoRA
        self._route_lock = threading.Lock()  # _base_lora / _plain_base (never held while waiting on the loop)
        self._load_lock = threading.Lock()  # one adapter load at a time
        self._prompt_logprob_lock = PromptLogprobLock()  # they run alone (a vLLM bug)

    async def _first_request(self) -> None:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs.engine import tokens_input

        # Shaped like the requests to come: the first one asking for logprobs compiles vLLM's
        # logprob op (torch.compile, ~1.5 s on CPU), paid here rather than in the first rollout.
        params = VSamplingParams(n=2, max_tokens=2, temperature=1.0, seed=0, logprobs=0, detokenize=False)
        async for _ in self.llm.generate(tokens_input([0]), params, f"rlpipe-first-{uuid.uuid4().hex}"):
            pass

    # ------------------------------------------------------------------ health

    @property
    def alive(self) -> bool:
        return not self._closed and not self._errored()

    def _errored(self) -> bool:
        llm = self.llm
        return llm is None or llm.errored

    def check_alive(self) -> None:
        if self._closed:
            raise EngineDeadError(f"the vLLM engine for {self.base_model} was shut down")
        if self._errored():
            raise EngineDeadError(
                f"the vLLM engine core for {self.base_model} has died (process exited or crashed); "
                "its requests failed. Call create_sampling_client again to start a fresh engine."
            )

    def unfinished_requests(self) -> int:
        """Requests the engine's front end still tracks (vLLM's output processor): in flight,
        not finished and not aborted."""
        llm = self.llm
        return llm.output_processor.get_num_unfinished_requests() if llm is not None else 0

    def engine_core_busy(self, timeout_s: float = 10.0) -> bool:
        """Whether the engine core process still has requests to step (asked from that
        process: its scheduler's own view, not the front end's)."""
        return bool(self._on_loop(self.llm.engine_core.call_utility_async("has_work"), timeout_s,
                                  "asking the engine core for its requests"))

    def engine_core_pids(self) -> list[int]:
        """PIDs of the engine-core processes (diagnostics and tests)."""
        manager = self.llm.engine_core.resources.engine_manager
        return [p.pid for p in manager.processes] if manager is not None else []

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, path: str, version: int, timeout_s: float = 300.0) -> Adapter:
        """Hot-load a PEFT adapter as policy `version`; running requests are not disturbed
        (weight_updates "between_requests"), or continue on it at their next token ("inflight")."""
        from vllm.lora.request import LoRARequest

        self.check_alive()
        adapter = snapshot_adapter(path, self._adapter_dir, next(self._ids), version, self.max_lora_rank, self.base_shapes)
        if self._live is not None:
            return self._load_live(adapter, path, timeout_s)
        existing = self.table.find(version, adapter.digest)
        if existing is not None:
            shutil.rmtree(adapter.path, ignore_errors=True)
            return existing
        request = LoRARequest(adapter.name, adapter.key, adapter.path)
        with self._load_lock:
            if self._lora_index_bug:
                self._guard_base_requests(timeout_s)
            try:
                self._on_loop(self.llm.add_lora(request), timeout_s, f"loading adapter {path}")
            except Exception as e:
                shutil.rmtree(adapter.path, ignore_errors=True)
                self.check_alive()
                raise ValueError(f"vLLM could not load adapter {path!r}: {type(e).__name__}: {e}") from e
            for old in self.table.add(adapter):
                self._loop.submit(self._remove(old)).add_done_callback(log_failure(f"removing adapter {old.name}"))
        return adapter

    def _load_live(self, adapter: Adapter, path: str, timeout_s: float) -> Adapter:
        live = self._live
        current = live.current
        if current is not None and current.version == adapter.version and current.digest == adapter.digest:
            shutil.rmtree(adapter.path, ignore_errors=True)
            return current
        with self._load_lock:
            if self._lora_index_bug:
                self._guard_base_requests(timeout_s)
            try:
                self._on_loop(live.swap(self.llm, self._prompt_logprob_lock, adapter), timeout_s, f"updating the live adapter to {path}")
            except Exception as e:
                shutil.rmtree(adapter.path, ignore_errors=True)
                self.check_alive()
                if isinstance(e, SamplingTimeout):
                    raise
                raise ValueError(f"vLLM could not load adapter {path!r}: {type(e).__name__}: {e}") from e
            live.retire_dirs(adapter)
            self.stats["inflight_updates"] += current is not None
        return adapter

    def _guard_base_requests(self, timeout_s: float) -> None:
        """Before an adapter load on CPU: route base requests through the zero adapter from now
        on, and before the adapter slots could reach the last one, let base requests that still
        run without LoRA finish."""
        if self._base_lora is None:
            zero = self._zero_adapter()
            with self._route_lock:
                self._base_lora = zero
        # slots in use after this load: the zero adapter + every registered version
        loaded = len(self.table.loaded()) if self._live is None else 0  # the live slot is replaced in place
        if 1 + loaded + 1 >= self._max_loras:
            deadline = time.monotonic() + timeout_s
            while self._plain_base > 0:
                if time.monotonic() > deadline:
                    raise SamplingError("base-model requests started before the first adapter load are still running")
                time.sleep(0.02)

    def _zero_adapter(self):
        """A LoRA whose delta is exactly zero, that base-model requests run under on CPU once
        any adapter has been loaded.

        vLLM's CPU LoRA ops (vllm/lora/ops/torch_ops, up to at least 0.32) gather the LoRA
        weights with the no-LoRA index -1, which Python wraps to the LAST adapter slot: once
        that slot has held an adapter (freed slots keep their weights), base-model tokens get
        its delta (wrong logprobs, no error; vllm-project/vllm PR #48421). Under the zero
        adapter no token has index -1. Slots fill first-free, so the last one cannot be used
        before the others are; until then plain base requests are safe, and ~4x faster on CPU
        (any LoRA in the batch makes vLLM CPU run its slow per-token LoRA ops)."""
        from vllm.lora.request import LoRARequest

        path = write_zero_adapter(self._adapter_dir / "zero-base", self.base_model, self.base_shapes)
        request = LoRARequest("rlpipe-base", next(self._ids), str(path))
        self._on_loop(self.llm.add_lora(request), 300, "loading the zero adapter")
        return request

    def _on_loop(self, coro, timeout_s: float, what: str):
        """Run coro on the engine loop and wait for it, but give up at once if the engine dies
        (vLLM leaves calls to a dead engine core waiting forever) or after timeout_s."""
        future = self._loop.submit(coro)
        deadline = time.monotonic() + timeout_s
        while True:
            done, _ = concurrent.futures.wait([future], timeout=min(HEALTH_POLL_S, max(0.0, deadline - time.monotonic())))
            if done:
                return future.result()
            if self._errored() or self._closed:
                future.cancel()
                self.check_alive()
            if time.monotonic() >= deadline:
                future.cancel()
                raise SamplingTimeout(f"{what} on the vLLM engine for {self.base_model} did not finish within {timeout_s:g} s")

    async def _remove(self, adapter: Adapter) -> None:
        if not self._errored():
            await self.llm.remove_lora(adapter.key)
        shutil.rmtree(adapter.path, ignore_errors=True)

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request):
        """Run one request on the engine loop; returns a concurrent.futures.Future."""
        from vllm.lora.request import LoRARequest

        a = request.adapter
        if a is not None and self._live is not None:
            # Every version runs on the live slot, and new requests carry the newest path
            # (its prefix-cache key): inflight.py.
            return self._loop.submit(self._run(request, self._live.request, plain=False, live=True))
        if a is not None:
            self.table.acquire(a)  # raises if evicted; pins it while in flight
            return self._loop.submit(self._run(request, LoRARequest(a.name, a.key, a.path), plain=False))
        with self._route_lock:
            lora = self._base_lora
            self._plain_base += lora is None
        return self._loop.submit(self._run(request, lora, plain=lora is None))

    async def _run(self, request: Request, lora, plain: bool, live: bool = False):
        try:
            return await self._watch(self._admitted(request, lora, live), request)
        except asyncio.CancelledError:
            if self._closed:  # cancelled by shutdown(): say so rather than "cancelled"
                raise EngineDeadError(f"the vLLM engine for {self.base_model} was shut down") from None
            raise
        finally:
            if plain:
                with self._route_lock:
                    self._plain_base -= 1
            if request.adapter is not None and not live:
                for old in self.table.release(request.adapter):
                    asyncio.ensure_future(self._remove(old)).add_done_callback(log_failure(f"removing adapter {old.name}"))

    async def _admitted(self, request: Request, lora, live: bool):
        async with self._prompt_logprob_lock.hold(exclusive=request.prompt_logprobs):  # see rlpipe/sampling/prompt_logprob_lock.py
            return await self._generate(request, lora, live)

    async def _watch(self, coro, request: Request):
        """Await coro, but give up with a clear error past the timeout or if the engine dies.
        Cancelling the generate() task makes vLLM abort the request; so does cancelling this
        one (the caller stopped waiting: SamplingClient cancels the request's future)."""
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_s
        while True:
            try:
                done, _ = await asyncio.wait({task}, timeout=max(0.0, min(HEALTH_POLL_S, deadline - loop.time())))
            except asyncio.CancelledError:
                task.cancel()  # asyncio.wait does not cancel what it waits for: generate() aborts now
                if not self._closed:
                    await asyncio.wait({task}, timeout=5.0)
                task.add_done_callback(log_failure("aborting a cancelled request"))
                raise
            if done:
                return task.result()
            if self._errored() or loop.time() >= deadline:
                task.cancel()
                await asyncio.wait({task}, timeout=5.0)  # let generate() abort the request
                task.add_done_callback(log_failure("aborting a request"))  # if it ends later, say how
                self.check_alive()
                what = "compute_logprobs" if request.logprobs_only else f"sample (n={request.num_samples}, max_tokens={request.decoding.max_tokens})"
                raise SamplingTimeout(
                    f"{what} on {self.base_model} (policy version {request.policy_version}) did not finish "
                    f"within {request.timeout_s:g} s; the request was aborted"
                )

    async def _generate(self, request: Request, lora, live: bool = False) -> SampleResponse | list[float | None]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

        d = request.decoding
        params = VSamplingParams(
            n=request.num_samples,
            max_tokens=d.max_tokens,
            temperature=d.temperature,
            top_k=d.top_k,
            top_p=d.top_p,
            seed=d.seed,  # vLLM gives sample i the seed seed + i
            stop=list(d.stop_strings) or None,
            stop_token_ids=list(d.stop_token_ids) or None,
            logprobs=None if request.logprobs_only else 0,  # 0: just the sampled token's logprob
            prompt_logprobs=0 if request.prompt_logprobs else None,
            detokenize=bool(d.stop_strings),  # text is only needed to match stop strings
            include_stop_str_in_output=True,  # the sequence keeps every sampled token, stop string included
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        try:
            async for out in self.llm.generate(tokens_input(request.prompt), params, uuid.uuid4().hex, lora_request=lora):
                final = out
        except VLLMEngineDead as e:
            raise EngineDeadError(f"the vLLM engine core for {self.base_model} died during the request") from e
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.check_alive()
            raise SamplingError(f"vLLM failed the request: {type(e).__name__}: {e}") from e
        if final is None:
            raise SamplingError("vLLM returned no output")
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(request.prompt)
        self.stats["cached_prompt_tokens"] += final.num_cached_tokens or 0
        self.stats["generated_tokens"] += sum(len(c.token_ids) for c in final.outputs)
        prompt_logprobs = None
        if request.prompt_logprobs:
            prompt_logprobs = [None] + [
                float(pos[t].logprob) for t, pos in zip(request.prompt[1:], final.prompt_logprobs[1:])
            ]
        if request.logprobs_only:
            return prompt_logprobs
        sequences = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            if c.finish_reason not in ("stop", "length"):
                raise SamplingError(f"vLLM finished a sequence with reason {c.finish_reason!r}")
            tokens = list(c.token_ids)
            # On the live slot, the version of each token is the one vLLM labelled its step with.
            versions = token_versions(c.weight_versions, len(tokens)) if live else None
            sequences.append(SampledSequence(
                stop_reason=c.finish_reason,
                tokens=tokens,
                logprobs=[float(pos[t].logprob) for t, pos in zip(tokens, c.logprobs)],
                policy_version=versions[0] if versions else request.policy_version,
                policy_versions=versions if versions and len(set(versions)) > 1 else None,
            ))
        return SampleResponse(sequences=sequences, prompt_logprobs=prompt_logprobs)

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self, shutdown_timeout_s: float = 2.0) -> None:
        """Stop the engine core (killed if it has not exited after shutdown_timeout_s)."""
        if self._closed:
            return
        self._closed = True

        async def stop():
            llm, self.llm = self.llm, None  # dropped here, not at interpreter exit (AsyncLLM.__del__)
            if llm is not None:
                llm.shutdown(timeout=shutdown_timeout_s)
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:  # requests and adapter removals still waiting on the engine
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

        try:
            self._loop.submit(stop()).result(shutdown_timeout_s + 60)
        finally:
            self._loop.stop()
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
