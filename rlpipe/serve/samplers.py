"""Sampling sessions of `rlpipe serve`: each one is a base model plus, optionally, a sampler
adapter, served by rlpipe's sampler (vLLM where installed, one engine per base model, the
adapter hot-loaded as a LoRA on first use).

In-flight sampling clients (save_weights_and_get_sampling_client(kind="inflight"), contract in
tinker/types/sampling_client_kind.py): every in-flight session of a training model samples the
model's one shared target, which each in-flight save moves to the weights it saved, for the
sessions made before it too. The target is read when a request starts and the whole request
runs on it: a request that started before a save finishes on the weights it started with,
one that starts after the save's future completed samples the new ones. So every request runs
on the weights saved when its client was created, or newer, as the contract promises; what
rlpipe serve does not do (yet) is switch a request already decoding to the newer weights at
its next token, which the contract allows but does not require. The target lives in memory:
after a restart an in-flight session samples the weights of its own save (still "those or
newer").
"""

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
        """By the weights they serve (adapter dir, or base:<model>), so in-flight sessions share one."""
        self._locks: dict[str, asyncio.Lock] = {}
        self.inflight: dict[str, tuple[str, int]] = {}
        """model_id -> (adapter dir, version) of its shared in-flight target."""
        self.inflight_of: dict[str, str] = {}
        """In-flight sampler_id -> its training model_id."""
        self.version_of: dict[str, tuple[str, int]] = {}
        """Ephemeral sampler_id -> (model_id, the model's optimizer step when it was saved)."""

    def published(self, sampler_id: str, model_id: str, adapter_dir, version: int, kind: str) -> None:
        """An ephemeral save (save_weights_and_get_sampling_client) finished: sampler_id serves
        adapter_dir; an in-flight one also moves the model's shared target there, for every
        in-flight session of the model. Called before the save's future completes, so a request
        sent after the client has the save's result sees the new target."""
        self.version_of[sampler_id] = (model_id, version)
        if kind == "inflight":
            self.inflight[model_id] = (str(adapter_dir), version)
            self.inflight_of[sampler_id] = model_id

    def weights(self, sampler_id: str) -> tuple[str | None, str | None, int | None]:
        """(adapter dir or None for the base, model_id, version) a request starting now samples."""
        row = self.info(sampler_id)
        model_id = self.inflight_of.get(sampler_id)
        if model_id is not None and model_id in self.inflight:
            adapter_dir, version = self.inflight[model_id]
            return adapter_dir, model_id, version
        model_id, version = self.version_of.get(sampler_id, (None, None))
        return row["adapter_dir"], model_id, version if row["adapter_dir"] else -1

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

    async def client(self, sampler_id: str, adapter_dir: str | None, fresh: bool = False) -> SamplingClient:
        row = self.info(sampler_id)
        key = adapter_dir or f"base:{row['base_model']}"
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if not fresh and key in self.clients:
                self.clients.move_to_end(key)
                return self.clients[key]
            base_dir = self.trainers.base_dir(row["base_model"])
            client = await asyncio.to_thread(create_sampling_client, base_dir, model_path=adapter_dir,
                                             backend=self.backend, **self.engine_options)
            self.clients[key] = client
            while len(self.clients) > KEEP_CLIENTS:
                old, _ = self.clients.popitem(last=False)
                self._locks.pop(old, None)
            return client

    async def sample(self, sampler_id: str, prompt: ModelInput, num_samples: int, params: SamplingParams,
                     prompt_logprobs: bool) -> tuple[SampleResponse, str | None, int | None]:
        """The response, and the model_id and version of the weights it was sampled with."""
        adapter_dir, model_id, version = self.weights(sampler_id)  # once, at the start: see the module's doc
        client = await self.client(sampler_id, adapter_dir)
        try:
            response = await client.sample_async(prompt, num_samples, params, prompt_logprobs)
        except AdapterEvictedError:
            # Too many adapter versions were in use at once: load this one again.
            client = await self.client(sampler_id, adapter_dir, fresh=True)
            response = await client.sample_async(prompt, num_samples, params, prompt_logprobs)
        return response, model_id, version
