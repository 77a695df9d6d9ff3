"""The pipeline through any Tinker endpoint: learner.backend = "tinker" and explorer.sampler = "tinker".

The learner trains through the official `tinker` SDK's TrainingClient and publishes the
tinker:// path of save_weights_for_sampler in its WeightUpdate (sampler_path, no adapter
bytes); the explorers sample through the SDK's SamplingClient on that path. The endpoint
is `rlpipe serve` or any other Tinker-compatible one (tinker_base_url / tinker_api_key in
the run config, else the SDK's TINKER_BASE_URL / TINKER_API_KEY).

    TinkerTrainingClient   (training.py) what the learner calls on its client (forward_backward, optim_step,
                           publish, checkpoint, evaluate, ...: pipeline/local_training.py), over the SDK
    TinkerEndpoint         (sampler.py) what the explorer calls on its ExplorerEngine (start, load, sample_async,
                           restart, ...), over the SDK; no engine of its own
    TinkerSamplingClient   (sampler.py) rlpipe's sampling-client shape (sample_async -> rlpipe SampleResponse)
    the type conversions   rlpipe/training/sdk.py (the core's: the reference loop uses them too)

Every SDK call is bounded: the SDK retries a refused connection for minutes, inside calls
that do not take a timeout (the first one builds its session), so those run on a daemon
thread that is abandoned, with a TimeoutError naming the endpoint, after the timeout.
An error answer of the endpoint surfaces at once: a request the endpoint refuses as bad
input fails the learner for good (Unrecoverable) and fails only its group in the explorer;
any other error of the endpoint in the explorer counts as a death of its "engine" and is
retried up to explorer.max_engine_restarts times, then fails the role.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable
from typing import Any


from rlpipe.pipeline.errors import Unrecoverable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
STATE_FILE = "tinker.json"
"""In the learner's directory: the tinker:// checkpoints this run saved, with their steps."""


def is_tinker_path(path: str) -> bool:
    return isinstance(path, str) and path.startswith("tinker://")


INFLIGHT = "inflight-sampler:"
"""With explorer.weight_updates = "inflight" a WeightUpdate's sampler_path is this prefix plus
the SDK's sampler handle (SamplingClient.get_sampler_handle: no credentials, no pickle) of the
learner's in-flight sampling client (save_weights_and_get_sampling_client(kind="inflight")),
not a tinker:// path: in-flight clients exist only through the training client."""


def weight_updates(config) -> str:
    """explorer.weight_updates: "between_requests" or "inflight"."""
    return config.explorer.weight_updates


def inflight_handle(sampler_path: str | None) -> str | None:
    """The sampler handle a sampler_path carries, or None for a tinker:// path."""
    if isinstance(sampler_path, str) and sampler_path.startswith(INFLIGHT):
        return sampler_path[len(INFLIGHT):]
    return None


def endpoint(config) -> str:
    return config.tinker_base_url or os.environ.get("TINKER_BASE_URL") or "the default Tinker endpoint"


def service_client(config):
    """A tinker.ServiceClient for the run: the config's base URL and API key, or (empty) the
    SDK's own TINKER_BASE_URL / TINKER_API_KEY. Lazy: nothing is sent until the first call."""
    import tinker

    return tinker.ServiceClient(base_url=config.tinker_base_url or None, api_key=config.tinker_api_key or None)


def check_reachable(config, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Unrecoverable unless the endpoint's host accepts a connection: the SDK retries a
    refused connection for about five minutes before it says so."""
    import socket
    from urllib.parse import urlsplit

    url = config.tinker_base_url or os.environ.get("TINKER_BASE_URL")
    if not url:
        return  # the SDK's default endpoint
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise Unrecoverable(f"cannot connect to the Tinker endpoint {url}: {err} (is it running? "
                            "tinker_base_url in the run config, or TINKER_BASE_URL)") from None


# --------------------------------------------------------------------------- bounded calls


def _in_daemon_thread(fn: Callable[[], Any]) -> concurrent.futures.Future:
    """fn() on a daemon thread: one that hangs can be abandoned and never keeps the process
    from exiting (asyncio.to_thread's and ThreadPoolExecutor's threads are joined at exit)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as err:  # noqa: BLE001  (handed to the waiter)
            future.set_exception(err)

    threading.Thread(target=run, name="rlpipe-tinker-call", daemon=True).start()
    return future


def _timeout_error(what: str, timeout_s: float, where: str) -> TimeoutError:
    return TimeoutError(f"{what}: no answer from the Tinker endpoint ({where}) within {timeout_s:.0f} s")


def call(fn: Callable[[], Any], timeout_s: float, what: str, where: str) -> Any:
    """fn() (a blocking SDK call), at most timeout_s; then TimeoutError."""
    try:
        return _in_daemon_thread(fn).result(timeout_s)
    except concurrent.futures.TimeoutError:
        raise _timeout_error(what, timeout_s, where) from None


async def call_async(fn: Callable[[], Any], timeout_s: float, what: str, where: str) -> Any:
    try:
        return await asyncio.wait_for(asyncio.wrap_future(_in_daemon_thread(fn)), timeout_s)
    except TimeoutError:
        raise _timeout_error(what, timeout_s, where) from None


async def wait_api_future(api_future, timeout_s: float, what: str, where: str) -> Any:
    """Await an SDK APIFuture from any event loop (the SDK runs its own, on its own thread);
    on timeout or cancellation the SDK's request is cancelled too."""
    future = api_future.future()
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
    except TimeoutError:
        raise _timeout_error(what, timeout_s, where) from None


def is_user_error(err: BaseException) -> bool:
    """The endpoint refused the request itself (bad input, unknown base model, ...): asking
    again cannot help."""
    import tinker
    from tinker._exceptions import RequestFailedError
    from tinker.types import RequestErrorCategory

    if isinstance(err, (tinker.BadRequestError, tinker.UnprocessableEntityError, tinker.AuthenticationError,
                        tinker.PermissionDeniedError)):
        return True
    return isinstance(err, RequestFailedError) and getattr(err, "category", None) == RequestErrorCategory.User


def refused(err: BaseException, what: str, where: str) -> BaseException:
    """err as raised to the role: Unrecoverable if the endpoint refused the request itself."""
    if is_user_error(err):
        return Unrecoverable(f"{what}: the Tinker endpoint ({where}) refused it: {type(err).__name__}: {err}")
    return err


class Pending:
    """An SDK future as the learner uses rlpipe's: .result() -> rlpipe's type, bounded by timeout_s."""

    def __init__(self, api_future, convert: Callable[[Any], Any], timeout_s: float, what: str, where: str):
        self.future = api_future.future() if hasattr(api_future, "future") else api_future
        self.convert, self.timeout_s, self.what, self.where = convert, timeout_s, what, where

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> Any:
        timeout = self.timeout_s if timeout is None else timeout
        try:
            out = self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            self.future.cancel()
            raise _timeout_error(self.what, timeout, self.where) from None
        except Exception as err:
            raise refused(err, self.what, self.where) from err
        return self.convert(out)


class Done:
    def __init__(self, value):
        self.value = value

    def result(self, timeout: float | None = None):
        return self.value


# --------------------------------------------------------------------------- conversions


# --------------------------------------------------------------------------- the learner's client


def tinker_loss_config(config: dict | None) -> dict | None:
    """The loss config as sent: rlpipe's learner always adds the sampling temperature, which
    only rlpipe's own losses know; at 1 (what Tinker scores at) it is left out."""
    out = dict(config or {})
    if out.get("temperature", 1.0) == 1.0:
        out.pop("temperature", None)
    return out or None
