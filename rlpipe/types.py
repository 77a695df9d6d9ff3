"""The Tinker-shaped data types, plus the trajectory and wire types of the pipeline.

One schema serves memory and the wire: every type here is a msgspec Struct, so the
transport encodes exactly what the code passes around. Names and semantics follow
`tinker.types` wherever Tinker has the concept.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import numpy as np

# --------------------------------------------------------------------------- model input


class EncodedTextChunk(msgspec.Struct, omit_defaults=True, gc=False):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


class ModelInput(msgspec.Struct, omit_defaults=True):
    """A sequence of token chunks fed to the model (only text chunks exist in rlpipe)."""

    chunks: list[EncodedTextChunk]

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[int(token)]))


# --------------------------------------------------------------------------- tensors


class TensorData(msgspec.Struct, omit_defaults=True, gc=False):
    """A flat array with its dtype and shape, as Tinker sends loss inputs and outputs."""

    data: list[float] | list[int]
    dtype: Literal["int64", "float32", "float64"]
    shape: list[int] | None = None

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        array = np.asarray(array)
        if array.dtype.kind in "iub":
            dtype = "int64"
        elif array.dtype == np.float64:
            dtype = "float64"
        elif array.dtype.kind == "f":
            dtype = "float32"
        else:
            raise TypeError(f"TensorData cannot hold arrays of dtype {array.dtype}")
        return cls(data=array.reshape(-1).tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        return cls.from_numpy(tensor.detach().cpu().numpy())

    @classmethod
    def coerce(cls, value: Any) -> TensorData:
        """Accept TensorData, numpy arrays, torch tensors and plain lists."""
        if isinstance(value, TensorData):
            return value
        if hasattr(value, "detach"):
            return cls.from_torch(value)
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError("loss inputs must be numeric arrays")
        if array.dtype.kind == "f" and array.dtype != np.float64:
            array = array.astype(np.float32)
        return cls.from_numpy(array)

    def to_numpy(self) -> np.ndarray:
        array = np.asarray(self.data, dtype=self.dtype)
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self) -> Any:
        import torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list:
        return self.to_numpy().tolist()


class Datum(msgspec.Struct, omit_defaults=True):
    """One training example. Inputs are already shifted: model_input = tokens[:-1],
    loss_fn_inputs["target_tokens"] = tokens[1:], one entry per model_input position."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData]

    def __post_init__(self) -> None:
        self.loss_fn_inputs = {k: TensorData.coerce(v) for k, v in self.loss_fn_inputs.items()}


# --------------------------------------------------------------------------- training


class AdamParams(msgspec.Struct, omit_defaults=True, frozen=True):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value before the step; 0 disables clipping."""


class LoraConfig(msgspec.Struct, omit_defaults=True, frozen=True):
    rank: int = 32
    seed: int | None = None
    """Seeds the LoRA initialisation; None draws from the current RNG."""
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    """Put LoRA on lm_head too."""


class ForwardBackwardOutput(msgspec.Struct, omit_defaults=True):
    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    """Per datum, in input order: at least "logprobs" (learner logprobs of target_tokens)."""
    metrics: dict[str, float]
    """Keys carry their reduction as a suffix, as in Tinker: "loss:sum", "ratio:mean", ..."""


class OptimStepResponse(msgspec.Struct, omit_defaults=True):
    step: int
    metrics: dict[str, float]


class SaveResponse(msgspec.Struct, omit_defaults=True):
    path: str


class LoadResponse(msgspec.Struct, omit_defaults=True):
    path: str
    step: int


class ModelInfo(msgspec.Struct, omit_defaults=True):
    base_model: str
    lora: LoraConfig
    vocab_size: int
    step: int
    trainable_params: int
    device: str
    dtype: str


# --------------------------------------------------------------------------- sampling


class SamplingParams(msgspec.Struct, omit_defaults=True, frozen=True):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    """Stop strings or stop token ids; the tokenizer's EOS always stops."""
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


StopReason = Literal["length", "stop"]


class SampledSequence(msgspec.Struct, omit_defaults=True):
    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    """Sampling logprob of each token under the distribution actually sampled from."""
    policy_version: int = 0
    """Version of the LoRA adapter that produced the first token (0 = base or first adapter);
    of every token unless policy_versions says otherwise."""
    policy_versions: list[int] | None = None
    """Version of each token, set only when they differ: an in-flight weight update
    (explorer.weight_updates = "inflight") reached the sequence while it was decoding."""

    def token_versions(self) -> list[int]:
        """The version of each token."""
        return list(self.policy_versions) if self.policy_versions is not None else [self.policy_version] * len(self.tokens)


class SampleResponse(msgspec.Struct, omit_defaults=True):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None


# --------------------------------------------------------------------------- trajectories


class Trajectory(msgspec.Struct, omit_defaults=True, gc=False):
    """One episode as the learner sees it: the full token history, token-in/token-out.

    All per-token lists have len(tokens). Observation tokens (prompt, tool output, other
    players' turns) have action_mask 0, sampling_logprob 0.0 and policy_version -1."""

    tokens: list[int]
    action_mask: list[int]
    sampling_logprobs: list[float]
    policy_versions: list[int]
    reward: float
    advantage: float = 0.0
    stop_reason: str = ""
    metrics: dict[str, float] = {}


# --------------------------------------------------------------------------- wire messages


class TrajectoryGroup(msgspec.Struct, tag="group", omit_defaults=True):
    """The trajectories of one EnvGroupBuilder; failed groups carry the error instead."""

    group_id: str
    trajectories: list[Trajectory]
    explorer_id: str = ""
    failed: bool = False
    error: str = ""
    created_at: float = 0.0
    explorer_stats: dict[str, float] = {}
    """The explorer's running figures when it pushed this group (sampler busy fraction,
    weight-sync latency, ...): how the learner's metrics learn about the sampling side."""
    run_id: str = ""
    """The run that sampled it (run_dir/run.json); the buffer drops groups of other runs."""
    incarnation: int = 0
    """The learner incarnation whose adapter sampled it (see WeightUpdate.incarnation)."""


class GroupAck(msgspec.Struct, tag="group_ack", omit_defaults=True):
    """Buffer to explorer: the group is durably decided. The explorer may forget it now.

    outcome is "accepted", "duplicate" (a re-send of a group already decided; the first
    decision stands) or the reason it was dropped ("invalid", "env_error", "other_run", ...)."""

    group_id: str
    outcome: str


class WeightUpdate(msgspec.Struct, tag="weights", omit_defaults=True):
    """A new sampler adapter: the two files of its PEFT adapter directory, as bytes (the
    learner never writes them to disk for this; the explorer writes them once, for vLLM),
    or, from a learner training through a Tinker endpoint (learner.backend = "tinker"),
    the tinker:// path of its sampler weights on that endpoint instead of the bytes."""

    version: int
    adapter_config: bytes = b""
    """adapter_config.json"""
    adapter_weights: bytes = b""
    """adapter_model.safetensors"""
    step: int = 0
    created_at: float = 0.0
    """time.time() when the learner started saving it, for the weight-sync latency."""
    run_id: str = ""
    incarnation: int = 0
    """Counts learner starts in this run (1, 2, ...). A restarted learner resumes from its
    checkpoint, so its versions can repeat or go back: an explorer takes any update of a new
    incarnation, whatever its version."""
    sampler_path: str | None = None
    """tinker://.../sampler_weights/... (save_weights_for_sampler on the Tinker endpoint), which
    explorers with explorer.sampler = "tinker" sample with; None with adapter bytes."""


class Heartbeat(msgspec.Struct, tag="heartbeat", omit_defaults=True):
    sender: str
    time: float
    version: int = 0


class Ready(msgspec.Struct, tag="ready", omit_defaults=True):
    sender: str


class Shutdown(msgspec.Struct, tag="shutdown", omit_defaults=True):
    reason: str = ""
    run_id: str = ""
    """The run whose learner asks; the buffer and explorers ignore a Shutdown of another run."""


class BatchRequest(msgspec.Struct, tag="batch_request", omit_defaults=True):
    """Learner to buffer: "I have trained everything up to after_seq; send the next batch".

    Pulling with an explicit position makes delivery idempotent: a learner that restarts
    from a checkpoint asks again from the checkpoint's position and nothing is lost."""

    sender: str
    learner_version: int
    after_seq: int
    max_groups: int
    run_id: str = ""
    """Must be the buffer's run: a request of another run is refused (not answered, counted)."""
    incarnation: int = 0
    """The learner's; groups sampled by another incarnation's adapters are not served, and a
    request of an incarnation older than the newest the buffer has seen is refused."""
    durable_seq: int = 0
    """The buffer position in the learner's newest checkpoint: a restarted learner asks again
    from there, so only groups at or below it may be compacted away."""


class Batch(msgspec.Struct, tag="batch", omit_defaults=True):
    """Buffer to learner: accepted groups in log order, with their log sequence numbers."""

    groups: list[TrajectoryGroup]
    seqs: list[int]
    dropped: dict[str, int] = {}
    """Cumulative drops by reason (stale, invalid, env_error, ...) for the metrics."""


class CreditRequest(msgspec.Struct, tag="credit_request", omit_defaults=True):
    """Explorer to buffer, on the experience socket: "I hold `holding` groups (rolling out, or
    finished and not yet acknowledged), I have started `started` groups since I began, I sample
    with adapter `version` of learner `incarnation`, and I could start `want` more now". Sent
    when the explorer wants to start groups, and at least every lease_s / 4 as a renewal
    (see rlpipe/pipeline/admission.py). Always the whole state, never a difference."""

    sender: str
    version: int
    incarnation: int
    holding: int
    started: int
    want: int
    oldest: int = -1
    """The oldest adapter version its held groups started with (-1 when it holds none): their
    deadline, which no grant to anyone may push them past."""
    run_id: str = ""


class CreditGrant(msgspec.Struct, tag="credit_grant", omit_defaults=True):
    """Buffer to explorer: it may start groups while its `started` count is below start_until,
    until lease_s / 2 after it sent its request; the buffer counts those credits for lease_s
    after receiving it. `reason` says why less than wanted was granted ("budget",
    "learner_unknown", "incarnation", "no_weights", "other_run"); "" when all of it was."""

    start_until: int
    lease_s: float
    reason: str = ""


Message = (TrajectoryGroup | GroupAck | WeightUpdate | Heartbeat | Ready | Shutdown | BatchRequest | Batch
           | CreditRequest | CreditGrant)
