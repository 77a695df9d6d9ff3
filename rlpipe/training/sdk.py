"""rlpipe's client shapes over the official `tinker` SDK, for code written against rlpipe's
types (the reference loop, rlpipe.loop): a Tinker endpoint (`rlpipe serve`, or hosted Tinker)
then trains and samples where the in-process TrainingClient would.

    import tinker
    client = SDKTrainingClient(tinker.ServiceClient(base_url=url).create_lora_training_client(
        base_model=model, rank=16))
    client.forward_backward(datums, "importance_sampling").result()     # rlpipe Datums in and out

The types are converted here and nowhere else; the SDK does its own retries and timeouts.
"""

from __future__ import annotations

import numpy as np

from rlpipe.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    TensorData,
)


def to_tinker_input(model_input: ModelInput):
    import tinker

    return tinker.types.ModelInput.from_ints(model_input.to_ints())


def to_tinker_datum(datum: Datum):
    import tinker

    return tinker.types.Datum(model_input=to_tinker_input(datum.model_input),
                              loss_fn_inputs={k: v.to_numpy() for k, v in datum.loss_fn_inputs.items()})


def from_tinker_forward_backward(out) -> ForwardBackwardOutput:
    return ForwardBackwardOutput(
        loss_fn_output_type=str(out.loss_fn_output_type),
        loss_fn_outputs=[{k: TensorData.from_numpy(np.asarray(v.to_numpy())) for k, v in row.items()}
                         for row in out.loss_fn_outputs],
        metrics={k: float(v) for k, v in (out.metrics or {}).items()},
    )


def to_tinker_adam(params: AdamParams):
    import tinker

    return tinker.types.AdamParams(learning_rate=params.learning_rate, beta1=params.beta1, beta2=params.beta2,
                                   eps=params.eps, weight_decay=params.weight_decay,
                                   grad_clip_norm=params.grad_clip_norm)


def to_tinker_params(params: SamplingParams):
    import tinker

    return tinker.types.SamplingParams(max_tokens=params.max_tokens, seed=params.seed, stop=params.stop,
                                       temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)


def from_tinker_sample(response, policy_version: int) -> SampleResponse:
    sequences = []
    for seq in response.sequences:
        reason = str(getattr(seq.stop_reason, "value", seq.stop_reason))
        if reason not in ("stop", "length"):
            raise ValueError(f"the Tinker endpoint returned stop_reason {reason!r} (want 'stop' or 'length')")
        logprobs = seq.logprobs
        sequences.append(SampledSequence(stop_reason=reason, tokens=[int(t) for t in seq.tokens],
                                         logprobs=[float(x) for x in logprobs] if logprobs is not None else None,
                                         policy_version=policy_version))
    return SampleResponse(sequences=sequences)


class Converted:
    """An SDK future whose result() comes back in rlpipe's types."""

    def __init__(self, future, convert, timeout_s: float | None):
        self.future, self.convert, self.timeout_s = future, convert, timeout_s

    def result(self, timeout: float | None = None):
        return self.convert(self.future.result(timeout=timeout or self.timeout_s))


class SDKSamplingClient:
    """sample / sample_async in rlpipe's types over an SDK SamplingClient; every sequence is
    marked with the policy version it was sampled from."""

    def __init__(self, client, policy_version: int, timeout_s: float | None = 600.0):
        self.client, self.policy_version, self.timeout_s = client, policy_version, timeout_s

    def sample(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams) -> Converted:
        future = self.client.sample(to_tinker_input(prompt), num_samples, to_tinker_params(sampling_params))
        return Converted(future, lambda out: from_tinker_sample(out, self.policy_version), self.timeout_s)

    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams) -> SampleResponse:
        # SDK 0.38: sample() hands back a future that can be awaited (sample_async is deprecated)
        response = await self.client.sample(to_tinker_input(prompt), num_samples, to_tinker_params(sampling_params))
        return from_tinker_sample(response, self.policy_version)


class SDKTrainingClient:
    """The training calls of rlpipe.training.client.TrainingClient that a loop needs, over an
    SDK TrainingClient (the same names, rlpipe's types)."""

    def __init__(self, client, timeout_s: float | None = 3600.0):
        self.client, self.timeout_s = client, timeout_s
        self.step = 0
        """Optimizer steps sent: the policy version of the weights saved next."""

    def get_tokenizer(self):
        return self.client.get_tokenizer()

    def forward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None) -> Converted:
        future = self.client.forward([to_tinker_datum(d) for d in data], loss_fn, loss_fn_config)
        return Converted(future, from_tinker_forward_backward, self.timeout_s)

    def forward_backward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None) -> Converted:
        future = self.client.forward_backward([to_tinker_datum(d) for d in data], loss_fn, loss_fn_config)
        return Converted(future, from_tinker_forward_backward, self.timeout_s)

    def optim_step(self, adam_params: AdamParams) -> Converted:
        future = self.client.optim_step(to_tinker_adam(adam_params))
        self.step += 1  # the SDK runs a client's requests in order: counted when sent
        step = self.step
        return Converted(future, lambda out: OptimStepResponse(
            step=step, metrics={k: float(v) for k, v in (getattr(out, "metrics", None) or {}).items()}), self.timeout_s)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SDKSamplingClient:
        # SDK 0.38 hands back a future of the sampling client (name no longer has an effect)
        sampler = self.client.save_weights_and_get_sampling_client(name).result(timeout=self.timeout_s)
        return SDKSamplingClient(sampler, policy_version=self.step)
