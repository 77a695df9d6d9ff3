"""Sampling: Tinker's SamplingClient over vLLM (AsyncLLM + LoRA hot-swap) or a local torch loop.

    client = create_sampling_client(base_model, model_path=adapter_dir, policy_version=3)
    response = client.sample(prompt, num_samples=4, sampling_params=params).result()
    response = await client.sample_async(prompt, 4, params)

One engine per base model per process is shared by all its clients; a client is one adapter
version on it. See client.py for the request semantics, vllm_backend.py for the engine.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import threading

from rlpipe.sampling.adapters import base_weight_shapes, check_adapter
from rlpipe.sampling.client import DEFAULT_TIMEOUT_S, SamplingClient
from rlpipe.sampling.errors import AdapterEvictedError, EngineDeadError, EngineStartError, SamplingError, SamplingTimeout

log = logging.getLogger(__name__)
BACKENDS = ("vllm", "local")


def default_backend() -> str:
    """The default backend: "vllm" where vLLM is installed, else "local"."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "local"


def resolve_backend(name: str | None) -> str:
    """A sampler as a config or a caller names it: "auto", "" or None is the default backend,
    any other name stays as it is ("vllm", "local"; the pipeline also knows "tinker")."""
    return default_backend() if name in (None, "", "auto") else name


_engines: dict[tuple[str, str], object] = {}
_engines_lock = threading.Lock()


def _engine_class(backend: str):
    if backend == "vllm":
        from rlpipe.sampling.vllm_backend import VLLMEngine

        return VLLMEngine
    if backend == "local":
        from rlpipe.sampling.local_backend import LocalEngine

        return LocalEngine
    raise ValueError(f"unknown sampling backend {backend!r}; choose one of {BACKENDS}")


def start_engine(base_model: str, backend: str | None = None, **engine_options):
    """A new engine that belongs to the caller alone (not shared, not restarted behind its
    back): the caller shuts it down. The explorer runs its engine this way, so that it
    decides when a dead one is replaced and reloads its adapter there."""
    return _engine_class(resolve_backend(backend))(str(base_model), **engine_options)


def get_engine(base_model: str, backend: str | None = None, **engine_options):
    """The process's shared engine for (backend, base_model), started on first use and again
    if it died. Options only take effect when an engine starts; later differing ones are logged."""
    backend = resolve_backend(backend)
    engine_class = _engine_class(backend)
    key = (backend, os.path.realpath(base_model))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is not None and engine.alive:
            differing = {k: v for k, v in engine_options.items() if engine.options.get(k, v) != v}
            if differing:
                log.warning("%s engine for %s already runs; ignoring differing options %s", backend, base_model, differing)
            return engine
        if engine is not None:
            log.warning("%s engine for %s is dead; starting a new one", backend, base_model)
            engine.shutdown()
        if not _engines:
            atexit.register(shutdown_engines)
        engine = _engines[key] = engine_class(str(base_model), **engine_options)
        return engine


def create_sampling_client(
    base_model: str,
    model_path: str | None = None,
    backend: str | None = None,
    *,
    policy_version: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **engine_options,
) -> SamplingClient:
    """A SamplingClient for base_model with the PEFT adapter at model_path (None: the base).

    policy_version: stamped on every sampled sequence (the learner's adapter version).
    timeout_s: default per-request timeout; past it a request is aborted and raises SamplingTimeout.
    backend: "vllm", "local", or None for vLLM where installed.
    engine_options: passed to the engine when it starts (VLLMEngine / LocalEngine keyword
    arguments, e.g. max_loaded_adapters, max_lora_rank, max_model_len; for vLLM also any
    vllm.AsyncEngineArgs field). An engine that cannot start raises EngineStartError."""
    if model_path is not None:
        # fail fast, before an engine starts
        check_adapter(str(model_path), engine_options.get("max_lora_rank"), base_weight_shapes(str(base_model)))
    engine = get_engine(base_model, backend, **engine_options)
    adapter = engine.load_adapter(str(model_path), policy_version) if model_path is not None else None
    return SamplingClient(engine, adapter, policy_version, timeout_s)


def shutdown_engines(base_model: str | None = None) -> None:
    """Shut down every sampling engine this process started, or only those for base_model."""
    with _engines_lock:
        keys = [k for k in _engines if base_model is None or k[1] == os.path.realpath(base_model)]
        engines = [_engines.pop(k) for k in keys]
    for engine in engines:
        try:
            engine.shutdown()
        except Exception:  # shutting down at exit: report, keep going with the others
            log.exception("shutting down the engine for %s failed", engine.base_model)


__all__ = [
    "AdapterEvictedError",
    "EngineDeadError",
    "EngineStartError",
    "SamplingClient",
    "SamplingError",
    "SamplingTimeout",
    "create_sampling_client",
    "default_backend",
    "get_engine",
    "resolve_backend",
    "shutdown_engines",
    "start_engine",
]
