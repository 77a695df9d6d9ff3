"""explorer.sampler = "tinker": the explorer samples through the official tinker SDK, on the
tinker:// sampler path each WeightUpdate carries (see backend.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import anyio

from rlpipe.pipeline.errors import Unrecoverable
from rlpipe.pipeline.explorer_engine import ServingState
from rlpipe.pipeline.tinker.backend import (
    call,
    call_async,
    check_reachable,
    endpoint,
    inflight_handle,
    is_user_error,
    refused,
    service_client,
    wait_api_future,
)
from rlpipe.sampling import EngineDeadError
from rlpipe.training.sdk import from_tinker_sample, to_tinker_input, to_tinker_params
from rlpipe.types import ModelInput, SampleResponse, SamplingParams, WeightUpdate

log = logging.getLogger(__name__)


class TinkerEndpointError(EngineDeadError):
    """The endpoint failed a sampling request (not as bad input): handled like a death of
    the explorer's engine (the sampling client is made again, at most max_restarts times)."""


class TinkerSamplingClient:
    """rlpipe's sampling-client shape (sample_async -> rlpipe SampleResponse) over an SDK SamplingClient."""

    def __init__(self, client, policy_version: int, timeout_s: float, where: str):
        self.client, self.policy_version = client, policy_version
        self.timeout_s, self.where = timeout_s, where
        self.alive = True
        """False once the endpoint failed a request of this client (see TinkerEndpointError)."""

    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams) -> SampleResponse:
        try:
            future = self.client.sample(to_tinker_input(prompt), num_samples, to_tinker_params(sampling_params))
            response = await wait_api_future(future, self.timeout_s, "sample", self.where)
        except (asyncio.CancelledError, TimeoutError):
            raise
        except Exception as err:
            if is_user_error(err):
                raise ValueError(f"the Tinker endpoint refused a sample request: {type(err).__name__}: {err}") from err
            self.alive = False
            raise TinkerEndpointError(f"the Tinker endpoint ({self.where}) failed a sample request: "
                                      f"{type(err).__name__}: {err}") from err
        return from_tinker_sample(response, self.policy_version)




class TinkerEndpoint:
    """The explorer's sampling through a Tinker endpoint (the interface of
    explorer_engine.ExplorerEngine): each WeightUpdate names a sampler path
    (tinker://.../sampler_weights/...) and a sampling client is made on it; requests in flight
    finish on the previous one. `serving`, the thing a group sees die, is the current client:
    an endpoint failure marks it dead and restart() makes a new one."""

    def __init__(self, config, *, name: str, request_timeout_s: float, max_restarts: int,
                 on_restart: Callable[[int], None] | None = None):
        self.config = config
        self.model = config.model_path()
        self.name = name
        self.where = endpoint(config)
        self.timeout_s = config.tinker_timeout_s
        self.request_timeout_s = request_timeout_s
        self.state = ServingState(name, "the Tinker endpoint's sampling client", max_restarts, on_restart)
        self.service = None
        self.client: TinkerSamplingClient | None = None
        """The sampling client of the current update; None before the first."""
        self.start_s = 0.0
        self._lock = anyio.Lock()

    version = property(lambda self: self.state.version)
    incarnation = property(lambda self: self.state.incarnation)
    update = property(lambda self: self.state.update)
    restarts = property(lambda self: self.state.restarts)
    serving = property(lambda self: self.client)
    ready = property(lambda self: self.client is not None)

    async def _new_client(self, model_path: str | None, version: int, what: str) -> TinkerSamplingClient:
        handle = inflight_handle(model_path)
        if handle is not None:  # explorer.weight_updates = "inflight": the learner's in-flight client
            import tinker

            api_key = self.config.tinker_api_key or None
            make = lambda: tinker.SamplingClient.from_sampler_handle(handle, api_key=api_key)
        elif model_path is not None:
            make = lambda: self.service.create_sampling_client(model_path=model_path).result()
        else:
            make = lambda: self.service.create_sampling_client(base_model=self.model).result()
        try:
            client = await call_async(make, self.timeout_s, what, self.where)
        except TimeoutError:
            raise
        except Exception as err:
            raise refused(err, f"{self.name}: {what}", self.where) from err
        return TinkerSamplingClient(client, version, self.request_timeout_s, self.where)

    async def start(self) -> None:
        """Connect: a sampling client on the base model, so a wrong endpoint, key or base model
        fails the role now (Unrecoverable when refused), not at the first rollout."""
        async with self._lock:
            started = time.monotonic()
            try:
                await anyio.to_thread.run_sync(check_reachable, self.config)
                self.service = service_client(self.config)
                await self._new_client(None, -1, f"create_sampling_client(base_model={self.model!r})")
            except Unrecoverable:
                raise
            except Exception as err:
                raise Unrecoverable(f"{self.name}: cannot sample through the Tinker endpoint ({self.where}): "
                                    f"{type(err).__name__}: {err}") from err
            self.start_s = time.monotonic() - started
            log.info("%s: sampling %s through the Tinker endpoint %s (ready in %.1f s)", self.name, self.model,
                     self.where, self.start_s)

    async def load(self, update: WeightUpdate) -> None:
        if not update.sampler_path:
            raise Unrecoverable(f"{self.name}: explorer.sampler = \"tinker\" needs the learner's sampler path, but "
                                f"WeightUpdate version {update.version} carries none: is the learner running with "
                                "learner.backend = \"tinker\"?")
        async with self._lock:
            self.client = await self._new_client(update.sampler_path, update.version,
                                                 _what(update.sampler_path))
            self.state.adopt(update)
        # An in-flight client's samples run on this version or newer (the endpoint may move a
        # request already decoding to newer weights); they are tagged with this version, the
        # lower bound, so the lag the pipeline sees is never less than the true one.
        shown = "the in-flight sampler" if inflight_handle(update.sampler_path) else update.sampler_path
        log.info("%s: sampling with %s (version %d)", self.name, shown, update.version)

    async def restart(self, dead, why: str) -> None:
        """The endpoint failed a request of `dead`: a new sampling client on the same weights,
        at most max_restarts times in the explorer's life; then EngineDeadError."""
        async with self._lock:
            if dead is None or self.client is not dead or dead.alive:
                return  # another group already replaced it
            self.state.spend_restart(why)
            path = self.update.sampler_path if self.update is not None else None
            self.client = await self._new_client(path, self.version, _what(path) if path else
                                                 f"create_sampling_client({self.model!r})")

    async def watch(self) -> None:
        """Nothing to watch: the endpoint's health shows in its answers."""

    def shutdown(self) -> None:
        self.client = None
        service, self.service = self.service, None
        if service is not None:
            try:
                call(lambda: service.close("success").result(), 10.0, "close the session", self.where)
            except Exception as err:  # noqa: BLE001
                log.warning("%s: could not close the Tinker session: %s: %s", self.name, type(err).__name__, err)

    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams,
                           client: TinkerSamplingClient | None = None) -> SampleResponse:
        return await self.state.sample(client or self.client, prompt, num_samples, sampling_params)


def _what(sampler_path: str) -> str:
    if inflight_handle(sampler_path) is not None:
        return "SamplingClient.from_sampler_handle(the learner's in-flight sampler)"
    return f"create_sampling_client(model_path={sampler_path!r})"
