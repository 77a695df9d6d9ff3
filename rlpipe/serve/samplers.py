"""Sampling sessions of `rlpipe serve`: each one is a base model plus, optionally, a sampler
adapter, served by rlpipe's sampler (vLLM where installed, one engine per base model, the
adapter hot-loaded as a LoRA on first use)."""

from __future__ import annotations

import asyncio
import collections
import logging

from rlpipe.sampling import AdapterEvictedError, create_sampling_client, default_backend
from rlpipe.sampling.client import SamplingClient
from rlpipe.serve.futures import NotFound, UserError
from rlpipe.types import ModelInput, SampleResponse, SamplingParams

log = logging.getLogger(__name__)
KEEP_CLIENTS = 256
"""Sampling clients kept ready (each holds a loaded adapter version; the engine evicts LRU)."""


class Samplers:
    def __init__(self, registry, trainers, backend: str | None, engine_options: dict):
        self.registry = registry
        self.trainers = trainers  # for base model names -> directories
        self.backend = backend or default_backend()
        self.engine_options = dict(engine_options)
        if self.backend != "vllm":  # the local sampler serves any rank
            self.engine_options.pop("max_lora_rank", None)
        self.clients: collections.OrderedDict[str, SamplingClient] = collections.OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    def check_lora(self, base_dir: str, lora) -> None:
        """Refuse an adapter the sampler could not serve, before any training time is spent on it:
        a rank over the engine's max_lora_rank, or LoRA on lm_head where vLLM has none (it has it
        for Llama and Qwen3 only)."""
        from rlpipe.sampling.vllm_support import lm_head_lora

        if self.backend != "vllm":
            return
        limit = self.engine_options.get("max_lora_rank", 32)
        if lora.rank > limit:
            raise UserError(f"LoRA rank {lora.rank} is over the sampler's max_lora_rank {limit}: "
                            f"start rlpipe serve with --max-lora-rank {lora.rank} or more")
        if lora.train_unembed and lm_head_lora(base_dir) is False:
            raise UserError(f"train_unembed=True: vLLM serves no LoRA on lm_head for {base_dir}; pass "
                            "train_unembed=False, or start rlpipe serve with --sampler local")

    def info(self, sampler_id: str) -> dict:
        row = self.registry.sampler(sampler_id)
        if row is None:
            raise NotFound(f"unknown sampling session {sampler_id!r}")
        return row

    async def client(self, sampler_id: str, fresh: bool = False) -> SamplingClient:
        row = self.info(sampler_id)
        lock = self._locks.setdefault(sampler_id, asyncio.Lock())
        async with lock:
            if not fresh and sampler_id in self.clients:
                self.clients.move_to_end(sampler_id)
                return self.clients[sampler_id]
            base_dir = self.trainers.base_dir(row["base_model"])
            client = await asyncio.to_thread(create_sampling_client, base_dir, model_path=row["adapter_dir"],
                                             backend=self.backend, **self.engine_options)
            self.clients[sampler_id] = client
            while len(self.clients) > KEEP_CLIENTS:
                old, _ = self.clients.popitem(last=False)
                self._locks.pop(old, None)
            return client

    async def sample(self, sampler_id: str, prompt: ModelInput, num_samples: int, params: SamplingParams,
                     prompt_logprobs: bool) -> SampleResponse:
        client = await self.client(sampler_id)
        try:
            return await client.sample_async(prompt, num_samples, params, prompt_logprobs)
        except AdapterEvictedError:
            # Too many adapter versions were in use at once: load this one again.
            client = await self.client(sampler_id, fresh=True)
            return await client.sample_async(prompt, num_samples, params, prompt_logprobs)
