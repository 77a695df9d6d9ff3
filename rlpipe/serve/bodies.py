"""The JSON request bodies of Tinker's HTTP API, one msgspec Struct each, as the official SDK
(0.38) sends them (`tinker.types.*Request`, dumped with exclude_none), and `decode`, the one
way a JSON body is read.

Fields the server has no use for (sdk_version, project_id, weights_access_token, ...) are not
declared: msgspec skips unknown fields, so a newer SDK's extra fields still pass. A body that
does not fit is a UserError (HTTP 400) naming the field, e.g. "Expected `int`, got `str` - at
`$.model_seq_id`". Bounds the sampler already checks with a clear message (temperature,
top_p, top_k, max_tokens, token ids) are left to it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

from rlpipe.serve.futures import UserError
from rlpipe.types import AdamParams, LoraConfig, ModelInput, SamplingParams

T = TypeVar("T")

SeqId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Ttl = Annotated[float, msgspec.Meta(gt=0, le=10 * 366 * 86400)]
"""Seconds a checkpoint is kept: Tinker allows up to 10 years (and a later date would not
print as a timestamp)."""
Unit = Annotated[float, msgspec.Meta(ge=0, lt=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0, le=1e30)]  # NaN fails every bound


def decode(raw: bytes, kind: type[T]) -> T:
    """raw as a kind, or a UserError that says which field is wrong and how."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:
        raise UserError(f"bad {kind.__name__} request: {e}") from None
    except msgspec.DecodeError as e:
        raise UserError(f"malformed JSON body: {e}") from None
    except RecursionError:  # msgspec stops at the interpreter's recursion limit
        raise UserError("malformed JSON body: nested too deeply") from None


# ------------------------------------------------------------------ pieces


class Optimizer(msgspec.Struct, frozen=True):
    """optimizer_config / optimizer_params: rlpipe trains with AdamW only."""

    type: str = "adamw"

    def __post_init__(self):  # a ValueError here is a ValidationError at this field's path
        if self.type != "adamw":
            raise ValueError(f"optimizer {self.type!r} is not supported: rlpipe trains with adamw")


class Lora(msgspec.Struct, frozen=True):
    rank: Annotated[int, msgspec.Meta(ge=1)]
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True

    def config(self) -> LoraConfig:
        return LoraConfig(**msgspec.structs.asdict(self))


class Adam(msgspec.Struct, frozen=True):
    learning_rate: NonNegative = 1e-4
    beta1: Unit = 0.9
    beta2: Unit = 0.95
    eps: NonNegative = 1e-12
    weight_decay: NonNegative = 0.0
    grad_clip_norm: Annotated[float, msgspec.Meta(ge=-1e30, le=1e30)] = 0.0
    """0 or less: no clipping."""

    def params(self) -> AdamParams:
        return AdamParams(**msgspec.structs.asdict(self))


class Sampling(msgspec.Struct, frozen=True):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None  # strings or token ids: the sampler refuses a mix
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0

    def params(self) -> SamplingParams:
        return SamplingParams(**msgspec.structs.asdict(self))


class FinishReason(msgspec.Struct, frozen=True):
    type: Literal["success", "errored", "interrupted"] = "success"


# ------------------------------------------------------------------ sessions and futures


class CreateSession(msgspec.Struct):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None


class SessionHeartbeat(msgspec.Struct):
    session_id: str


class FinishSession(msgspec.Struct):
    reason: FinishReason = FinishReason()


class RetrieveFuture(msgspec.Struct):
    request_id: str


# ------------------------------------------------------------------ training


class CreateModel(msgspec.Struct):
    session_id: str
    model_seq_id: SeqId
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: Lora | None = None
    optimizer_config: Optimizer = Optimizer()


class ModelRef(msgspec.Struct):
    """get_info and unload_model."""

    model_id: str


class OptimStep(msgspec.Struct):
    model_id: str
    seq_id: SeqId
    adam_params: Adam = Adam()
    optimizer_params: Optimizer | None = None  # what the SDK sends for a non-Adam optimizer


class SaveWeights(msgspec.Struct):
    model_id: str
    seq_id: SeqId
    path: str
    ttl_seconds: Ttl | None = None
    overwrite: bool = False


class LoadWeights(msgspec.Struct):
    """Into a live model (model_id, seq_id), or into a new one (session_id, model_seq_id):
    create_training_client_from_state."""

    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: SeqId | None = None
    session_id: str | None = None
    model_seq_id: SeqId | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: Optimizer | None = None


class SaveWeightsForSampler(msgspec.Struct):
    """A named sampler checkpoint (path), or an ephemeral one for a sampling session
    (sampling_session_seq_id): save_weights_and_get_sampling_client."""

    model_id: str
    seq_id: SeqId
    path: str | None = None
    sampling_session_seq_id: SeqId | None = None
    ttl_seconds: Ttl | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    """tinker.types.SamplingClientKind: inflight publishes the model's shared, mutable sampler weights."""


class SaveWeightsExternal(msgspec.Struct):
    model_id: str
    seq_id: SeqId
    path: str
    ttl_seconds: Ttl | None = None
    age_encryption_recipients: list[str] | None = None


# ------------------------------------------------------------------ sampling


class CreateSamplingSession(msgspec.Struct):
    session_id: str
    sampling_session_seq_id: SeqId
    base_model: str | None = None
    model_path: str | None = None


class Sample(msgspec.Struct):
    """asample. An image chunk in the prompt is refused at its `type`: rlpipe serves text models."""

    prompt: ModelInput
    sampling_params: Sampling = Sampling()
    num_samples: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    seq_id: SeqId | None = None
    prompt_logprobs: bool | None = None
    prompt_logprobs_last_n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    record_stability_info: bool | None = None
    """Record each sequence for stable_reinforce (stability.py)."""

    def unsupported(self) -> list[str]:
        return [name for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k",
                                  "target_prompt_logprobs") if getattr(self, name)]


# ------------------------------------------------------------------ REST


class SetTtl(msgspec.Struct):
    ttl_seconds: Ttl | None = None


class WeightsInfo(msgspec.Struct):
    tinker_path: str
