"""In-flight weight updates on the vLLM engine (explorer.weight_updates = "inflight").

An engine started with weight_updates="inflight" samples every adapter request through ONE
live LoRA slot (one vLLM int id, pinned). Loading version v+1 replaces that slot's weights
under the requests already decoding, which continue at their next token on v+1; none is
aborted. The mechanism (vLLM 0.32, read in its source):

1. `AsyncLLM.pause_generation(mode="keep", clear_cache=True)`: the scheduler stops at a step
   boundary; running requests stay requests (nothing is aborted, their sampled tokens and
   logprobs are kept). clear_cache=True preempts them: their KV is freed and, on resume,
   prompt + tokens so far are prefilled again, under the weights loaded by then.
2. `add_lora(LoRARequest(name, same_id, new_snapshot_path, load_inplace=True))`: the worker
   loads the new directory first (a bad one fails here and the old weights stay), then
   replaces the registered adapter and its slot; `pin_lora` again (the replacement unpins).
3. `update_weight_version(str(v+1))`, then `resume_generation()` (in a finally).

Versions per token: vLLM labels each engine step's outputs with the engine's weight version
(set while paused, so a step is never half one version), and a finished CompletionOutput
carries `weight_versions`, spans of output tokens per label. token_versions() turns those
into one version per token; that is the bookkeeping of the step that computed the token, so
it is right even when outputs reach the front end after the update (own bookkeeping at the
front end would race with that).

Keep the KV or recompute it (clear_cache False or True), measured on the embedded model
(benchmarks/bench_inflight.py: 16 sequences of up to 192 tokens decoding, 3 updates each one
real learner step apart, 2 CPU cores shared with other work, so times are rough):
- keep (PipelineRL's choice): tokens after an update attend to KV the old weights wrote, so
  their sampling logprob is no version's: against the learner's logprob under the version
  that sampled them, mean |d| 1e-2 to 3e-2 and max 1.0 to 2.1, 1000x the fidelity bound
  (1e-3); with two unrelated adapters (tests/test_inflight_vllm.py) max 33. The importance
  ratio would still use the true behaviour probability, but the per-token version would not
  name a policy the learner can score.
- recompute: mean |d| 4e-7, max 7e-6 (fp32 noise), because every token is computed from KV
  written entirely by the weights that sampled it. The price is one prefill of the context
  in flight per update; here it did not show: the update call took 35-42 ms (pause 31-35 ms)
  either way, and the running batch lost 105-117 ms per update either way (noise included).
rlpipe recomputes, so the DESIGN invariant ("the sampling logprob of every token is the one
its version gave") holds exactly and per-token versions stay meaningful. On a GPU with long
contexts the re-prefill grows with the tokens in flight; the benchmark prints it.

CPU: re-prefilling many requests at once gets chunked, and a seeded request's chunked
prefill kills vLLM 0.32's CPU engine (it rewinds a CPU torch.Generator); an in-flight engine
on CPU therefore runs without chunked prefill (vllm_backend.VLLMEngine).

Prefix cache: vLLM keys KV blocks by the request's LoRA name and path, not the int id. Each
version's snapshot has its own path and new requests always carry the live version's path
(LiveAdapter.request), so a request after an update never reuses blocks computed under an
earlier version; the pause also clears the prefix cache (clear_cache=True), so even
requests queued during the update with the older path find nothing stale.

Engines and clients: in this mode every load_adapter on the engine replaces the live
weights, so a client of an older version samples with the newest (its tokens say so). The
explorer owns its engine, which is what the mode is for; snapshot semantics (several
versions side by side, each request finishing on its own) are weight_updates =
"between_requests".
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import time

from rlpipe.sampling.adapters import Adapter
from rlpipe.sampling.errors import SamplingError

WEIGHT_UPDATES = ("between_requests", "inflight")


def check_mode(weight_updates: str) -> str:
    if weight_updates not in WEIGHT_UPDATES:
        raise ValueError(f"weight_updates must be one of {WEIGHT_UPDATES}, got {weight_updates!r}")
    return weight_updates


class LiveAdapter:
    """The one LoRA slot an in-flight engine samples with, and the versions it has held."""

    def __init__(self, key: int, keep_dirs: int, recompute_kv: bool = True):
        self.key = key
        self.name = f"rlpipe-live-{key}"
        self.recompute_kv = recompute_kv
        self.current: Adapter | None = None
        self.request = None
        """The LoRARequest new requests carry: the current version's snapshot path (per-version
        prefix-cache keys), load_inplace False (True would reload it every step)."""
        self._dirs: collections.deque[str] = collections.deque()
        self._keep_dirs = max(2, keep_dirs)
        self.pause_ms: list[float] = []
        """Wall time generation was paused for each update (the first load pauses nothing)."""

    async def swap(self, llm, prompt_logprob_lock, adapter: Adapter) -> None:
        """Put adapter's weights into the live slot (on the engine loop). Requests decoding now
        continue on them at their next token."""
        from vllm.lora.request import LoRARequest

        adapter.key = self.key
        first = self.current is None
        load = LoRARequest(self.name, self.key, adapter.path, load_inplace=not first)
        if first:
            await llm.add_lora(load)
            await llm.pin_lora(self.key)
            await llm.update_weight_version(str(adapter.version))
        else:
            # Shared hold: a prompt-logprob request (run alone, prompt_logprob_lock.py) finishes on one version.
            async with prompt_logprob_lock.hold(exclusive=False):
                started = time.perf_counter()
                await llm.pause_generation(mode="keep", clear_cache=self.recompute_kv)
                try:
                    await llm.add_lora(load)
                    await llm.pin_lora(self.key)  # the in-place replacement unpinned it
                    await llm.update_weight_version(str(adapter.version))
                finally:
                    await asyncio.shield(llm.resume_generation())
                self.pause_ms.append((time.perf_counter() - started) * 1e3)
        self.current = adapter
        self.request = LoRARequest(self.name, self.key, adapter.path)

    def retire_dirs(self, adapter: Adapter) -> None:
        """Delete snapshot directories of versions long replaced. The slot is pinned, so vLLM
        never reloads it from a running request's older path; a few are kept regardless."""
        self._dirs.append(adapter.path)
        while len(self._dirs) > self._keep_dirs:
            shutil.rmtree(self._dirs.popleft(), ignore_errors=True)


def token_versions(spans, num_tokens: int) -> list[int] | None:
    """One version per output token from vLLM's WeightVersionSpans (None: no labels, or one
    that is not a version of ours, e.g. tokens sampled before the first adapter)."""
    if not spans:
        return None
    versions: list[int] = []
    for span in spans:
        try:
            version = int(span.version)
        except ValueError:
            return None
        versions += [version] * (span.end - span.start)
    if len(versions) < num_tokens:
        raise SamplingError(f"vLLM labelled {len(versions)} of {num_tokens} tokens with a weight version")
    return versions[:num_tokens]  # a stop string's surplus tokens were trimmed after labelling
