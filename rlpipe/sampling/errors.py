"""The errors a sampling call can raise besides ValueError / FileNotFoundError for bad input."""


class SamplingError(RuntimeError):
    """A sampling request failed inside the engine."""


class SamplingTimeout(SamplingError):
    """A request ran past its timeout; it was aborted in the engine.
    (Not a TimeoutError subclass: APIFuture.result would mistake it for its own wait timing out.)"""


class EngineDeadError(SamplingError):
    """The engine (e.g. vLLM's engine-core process) died; it cannot serve requests any more.
    `create_sampling_client` builds a fresh engine on the next call."""


class AdapterEvictedError(SamplingError):
    """The client's adapter version was evicted to make room for newer ones
    (max_loaded_adapters); make a client for a newer version."""


class EngineStartError(SamplingError):
    """An engine could not start for this model and these settings; the message names both."""
