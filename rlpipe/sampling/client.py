"""SamplingClient: Tinker's sampling surface over one engine and one adapter version.

A client is cheap: it pairs a shared engine (one per base model per process, see the
backends) with one loaded adapter version. A new policy version means a new client from
`create_sampling_client`; requests already running on the old client finish on the old
weights. Everything a caller can get wrong is checked here, before the engine sees it, so
a bad request raises a clear ValueError / FileNotFoundError and the engine stays healthy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from typing import Protocol

from rlpipe.training.api_future import APIFuture, CallTimeout
from rlpipe.sampling.adapters import Adapter
from rlpipe.sampling.errors import AdapterEvictedError, EngineDeadError, SamplingError, SamplingTimeout
from rlpipe.types import ModelInput, SampleResponse, SamplingParams

DEFAULT_TIMEOUT_S = 600.0
# The engine enforces the request timeout itself (and aborts the request); the future's
# own deadline is a backstop a little later, for a wedged engine thread.
FUTURE_GRACE_S = 30.0
__all__ = ["AdapterEvictedError", "EngineDeadError", "SamplingClient", "SamplingError", "SamplingTimeout"]


@dataclasses.dataclass(frozen=True)
class Decoding:
    """SamplingParams checked and resolved against one prompt and engine."""

    max_tokens: int
    temperature: float
    top_k: int  # -1: off
    top_p: float
    seed: int | None
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...]


class Engine(Protocol):
    """What a backend provides (rlpipe.sampling.vllm_backend / local_backend)."""

    base_model: str
    vocab_size: int
    max_model_len: int

    def load_adapter(self, path: str, version: int) -> Adapter: ...

    def submit(self, request: Request) -> concurrent.futures.Future: ...

    def check_alive(self) -> None: ...


@dataclasses.dataclass
class Request:
    prompt: list[int]
    num_samples: int
    decoding: Decoding
    adapter: Adapter | None
    policy_version: int
    timeout_s: float
    prompt_logprobs: bool = False
    logprobs_only: bool = False  # compute_logprobs: score the prompt, sample nothing
    deadline: float = 0.0  # set by backends that enforce timeout_s themselves
    cancelled: bool = False  # set when the caller stopped waiting; a backend stops working on it


class SamplingClient:
    def __init__(self, engine: Engine, adapter: Adapter | None, policy_version: int, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.engine = engine
        self.adapter = adapter
        self.policy_version = policy_version
        self.timeout_s = timeout_s

    @property
    def base_model(self) -> str:
        return self.engine.base_model

    @property
    def model_path(self) -> str | None:
        return self.adapter.source if self.adapter else None

    def __repr__(self) -> str:
        return f"SamplingClient({type(self.engine).__name__}, base={self.base_model!r}, adapter={self.model_path!r}, version={self.policy_version})"

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        *,
        timeout: float | None = None,
    ) -> APIFuture[SampleResponse]:
        """num_samples sequences continuing prompt; each carries its tokens, the logprob of
        every token under the distribution it was sampled from (temperature, top_k, top_p
        applied), stop_reason and policy_version. Bad input raises here, synchronously."""
        prompt_ids = check_prompt(prompt, self.engine.vocab_size, self.engine.max_model_len, room=1)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        decoding = resolve_params(sampling_params, len(prompt_ids), self.engine.vocab_size, self.engine.max_model_len)
        return self._submit(Request(prompt_ids, num_samples, decoding, self.adapter, self.policy_version,
                                    self._timeout(timeout), prompt_logprobs=include_prompt_logprobs), "sample")

    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams,
                           include_prompt_logprobs: bool = False, *, timeout: float | None = None) -> SampleResponse:
        """sample(), awaited. Cancelling the awaiting task aborts the request in the engine
        (an episode that timed out or was cancelled stops decoding at once)."""
        prompt_ids = check_prompt(prompt, self.engine.vocab_size, self.engine.max_model_len, room=1)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        decoding = resolve_params(sampling_params, len(prompt_ids), self.engine.vocab_size, self.engine.max_model_len)
        return await self._await(Request(prompt_ids, num_samples, decoding, self.adapter, self.policy_version,
                                         self._timeout(timeout), prompt_logprobs=include_prompt_logprobs), "sample")

    def compute_logprobs(self, prompt: ModelInput, *, timeout: float | None = None) -> APIFuture[list[float | None]]:
        """Logprob of each prompt token given the ones before it (temperature 1); the first is None."""
        prompt_ids = check_prompt(prompt, self.engine.vocab_size, self.engine.max_model_len, room=0)
        decoding = Decoding(1, 1.0, -1, 1.0, None, (), ())
        return self._submit(Request(prompt_ids, 1, decoding, self.adapter, self.policy_version,
                                    self._timeout(timeout), prompt_logprobs=True, logprobs_only=True), "compute_logprobs")

    async def compute_logprobs_async(self, prompt: ModelInput, *, timeout: float | None = None) -> list[float | None]:
        prompt_ids = check_prompt(prompt, self.engine.vocab_size, self.engine.max_model_len, room=0)
        decoding = Decoding(1, 1.0, -1, 1.0, None, (), ())
        return await self._await(Request(prompt_ids, 1, decoding, self.adapter, self.policy_version,
                                         self._timeout(timeout), prompt_logprobs=True, logprobs_only=True), "compute_logprobs")

    def _timeout(self, timeout: float | None) -> float:
        timeout = self.timeout_s if timeout is None else float(timeout)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        return timeout

    def _submit(self, request: Request, what: str) -> APIFuture:
        self.engine.check_alive()
        return APIFuture(self.engine.submit(request), what, request.timeout_s + FUTURE_GRACE_S)

    async def _await(self, request: Request, what: str):
        """Submit and await; if the awaiting task is cancelled, so is the request: the engine's
        future is cancelled (the vLLM backend then aborts the request on its loop) and the
        request is flagged (the local backend stops decoding it)."""
        self.engine.check_alive()
        future = self.engine.submit(request)
        limit = request.timeout_s + FUTURE_GRACE_S
        try:
            # Not shielded (unlike APIFuture.result_async): cancelling this wait cancels `future`.
            return await asyncio.wait_for(asyncio.wrap_future(future), limit)
        except asyncio.CancelledError:
            request.cancelled = True
            future.cancel()
            raise
        except TimeoutError:  # the engine's own timeout (SamplingTimeout) is no TimeoutError
            request.cancelled = True
            raise CallTimeout(f"{what} did not finish within {limit:.0f} s") from None


# --------------------------------------------------------------------------- validation


def check_prompt(prompt: ModelInput, vocab_size: int, max_model_len: int, room: int) -> list[int]:
    """The prompt's token ids, or a ValueError saying what is wrong with them.
    room: tokens that must still fit after the prompt (1 to sample anything)."""
    if isinstance(prompt, ModelInput):
        ids = prompt.to_ints()
    else:
        raise TypeError(f"prompt must be a ModelInput (ModelInput.from_ints(tokens)), got {type(prompt).__name__}")
    if not ids:
        raise ValueError("prompt is empty: give at least one token")
    if len(ids) + room > max_model_len:
        raise ValueError(
            f"prompt has {len(ids)} tokens; the context (max_model_len) is {max_model_len}"
            + (", leaving no room to sample" if room and len(ids) <= max_model_len else "")
        )
    bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size]
    if bad:
        where = ", ".join(f"position {i}: {t}" for i, t in bad[:5])
        raise ValueError(f"prompt has {len(bad)} token id(s) outside the vocabulary [0, {vocab_size}): {where}")
    return ids


def resolve_params(params: SamplingParams, prompt_len: int, vocab_size: int, max_model_len: int) -> Decoding:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    room = max_model_len - prompt_len
    if params.max_tokens is not None and params.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
    # A request may ask for more than fits; it then ends with stop_reason "length" at the context end.
    max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
    if not 0 <= params.temperature <= 2:  # vLLM's range, kept for every backend
        raise ValueError(f"temperature must be in [0, 2], got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k != -1 and params.top_k < 1:
        raise ValueError(f"top_k must be -1 (off) or >= 1, got {params.top_k}")
    stop = params.stop
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    strings = tuple(s for s in stop if isinstance(s, str))
    ids = tuple(int(t) for t in stop if not isinstance(t, str))
    if strings and ids:
        raise ValueError("stop must be all strings or all token ids, not a mix")
    if any(s == "" for s in strings):
        raise ValueError("stop strings must not be empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop token id(s) {bad} outside the vocabulary [0, {vocab_size})")
    top_k = -1 if params.top_k >= vocab_size else params.top_k
    return Decoding(max_tokens, float(params.temperature), top_k, float(params.top_p), params.seed, strings, ids)
