"""Sampling: Tinker's SamplingClient over vLLM (AsyncLLM + LoRA hot-swap) or a local torch loop.

    client = create_sampling_client(base_model, model_path=adapter_dir, policy_version=3)
    response = client.sample(prompt, num_samples=4, sampling_params=params).result()
    response = await client.sample_async(prompt, 4, params)

One engine per base model per process is shared by all its clients; a client is one adapter
version on it. See client.py for the request semantics, vllm_backend.py for the engine.
"""

from __future__ import annotations

import importlib.util

from rlpipe.sampling.adapters import base_weight_shapes, check_adapter
from rlpipe.sampling.client import DEFAULT_TIMEOUT_S, SamplingClient
from rlpipe.sampling.errors import AdapterEvictedError, EngineDeadError, SamplingError, SamplingTimeout

BACKENDS = ("vllm", "local")


def default_backend() -> str:
    """The default backend: "vllm" where vLLM is installed, else "local"."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "local"


def get_engine(base_model: str, backend: str | None = None, **engine_options):
    """The shared engine of this process for base_model (started on first use)."""
    backend = backend or default_backend()
    if backend == "vllm":
        from rlpipe.sampling.vllm_backend import get_engine as get
    elif backend == "local":
        from rlpipe.sampling.local_backend import get_engine as get
    else:
        raise ValueError(f"unknown sampling backend {backend!r}; choose one of {BACKENDS}")
    return get(str(base_model), **engine_options)


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
    arguments, e.g. max_loaded_adapters, max_lora_rank, max_model_len)."""
    if model_path is not None:
        # fail fast, before an engine starts
        check_adapter(str(model_path), engine_options.get("max_lora_rank"), base_weight_shapes(str(base_model)))
    engine = get_engine(base_model, backend, **engine_options)
    adapter = engine.load_adapter(str(model_path), policy_version) if model_path is not None else None
    return SamplingClient(engine, adapter, policy_version, timeout_s)


def shutdown_engines() -> None:
    """Shut down every sampling engine this process started."""
    import sys

    for name in ("rlpipe.sampling.vllm_backend", "rlpipe.sampling.local_backend"):
        module = sys.modules.get(name)
        if module is not None:
            module.shutdown_engines()


__all__ = [
    "AdapterEvictedError",
    "EngineDeadError",
    "SamplingClient",
    "SamplingError",
    "SamplingTimeout",
    "create_sampling_client",
    "default_backend",
    "get_engine",
    "shutdown_engines",
]
