"""TrainingClient: the Tinker training primitives on a peft LoRA model.

Every call is queued on one worker thread per client, so calls run in the order they were
submitted and `forward_backward(...)`, `optim_step(...)` can be issued back to back, then
awaited. Gradients accumulate across forward_backward calls until optim_step.

(About 420 lines, over the 400 a module keeps to: the primitives share the worker queue, the
optimizer and the adapter state, and split apart each would reach into the others' fields.)
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from rlpipe.losses import LOSSES, check_inputs, compute_loss
from rlpipe.training import checkpoint, packing
from rlpipe.training.api_future import APIFuture
from rlpipe.training.forward import ForwardPass, default_layout
from rlpipe.training.lora import SharedBase
from rlpipe.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoadResponse,
    LoraConfig,
    ModelInfo,
    OptimStepResponse,
    SaveResponse,
    TensorData,
)

CustomLossFn = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def _split(lp: torch.Tensor, data: list[Datum], indices: list[int]) -> list[torch.Tensor]:
    return list(lp.split([data[i].model_input.length for i in indices]))


def _scatter(out, parts, data: list[Datum], indices: list[int]) -> None:
    """Put each micro-batch tensor of parts (None: skipped) into its per-datum list of out."""
    for per_datum, part in zip(out, parts):
        if part is not None:
            for i, piece in zip(indices, _split(part, data, indices)):
                per_datum[i] = piece


def _counted_mean(values_T: torch.Tensor, weights_T: torch.Tensor | None) -> float:
    """The mean over the counted tokens (weight > 0; all without weights); 0.0 when none, as
    the losses report an empty mean."""
    if weights_T is not None:
        values_T = values_T[weights_T.to(values_T.device) > 0]
    return values_T.double().mean().item() if values_T.numel() else 0.0


def _cat(inputs: list[dict[str, torch.Tensor]], indices) -> dict[str, torch.Tensor]:
    indices = list(indices)
    return {name: torch.cat([inputs[i][name] for i in indices]) for name in inputs[indices[0]]}


def _call_custom(fn: CustomLossFn, data: list[Datum], logprobs: list[torch.Tensor]):
    loss, metrics = fn(data, logprobs)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise TypeError("a custom loss function must return (scalar tensor, metrics dict)")
    return loss, metrics


class _RestoreGrads:
    def __init__(self, params: list[torch.Tensor]):
        self.params = params

    def __enter__(self):
        self.saved = [None if p.grad is None else p.grad.clone() for p in self.params]

    def __exit__(self, kind, value, tb):
        if kind is not None:
            for p, g in zip(self.params, self.saved):
                p.grad = g
        return False


class TrainingClient:
    def __init__(
        self,
        base_model: str,
        lora: LoraConfig,
        checkpoint_dir: str | Path,
        *,
        shared: SharedBase | None = None,
        device: str | None = None,
        dtype: str | None = None,
        layout: str | None = None,
        row_tokens: int | None = None,
        max_tokens_per_micro_batch: int = 0,
        gradient_checkpointing: bool = False,
        place: Callable[[torch.nn.Module], None] | None = None,
        call_timeout_s: float = 3600.0,
    ):
        """shared: the SharedBase to put this client's adapter on (rlpipe serve: many clients,
        one copy of the base); None loads a base of its own, with device, dtype,
        gradient_checkpointing and place as SharedBase takes them.
        layout: "rows", "padded" or "varlen" (rlpipe.training.packing), default per device
        (rlpipe.training.forward.default_layout), with row_tokens the row width of "rows".
        max_tokens_per_micro_batch: split each forward_backward into micro-batches of at most
        this many tokens (pads included) and accumulate their gradients; 0 = one piece."""
        if lora.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {lora.rank}")
        if max_tokens_per_micro_batch < 0:
            raise ValueError(f"max_tokens_per_micro_batch must be >= 0, got {max_tokens_per_micro_batch}")
        if shared is not None and os.path.realpath(shared.base_model) != os.path.realpath(str(base_model)):
            raise ValueError(f"the shared base is {shared.base_model}, not {base_model}")
        self.base = shared or SharedBase(base_model, device=device, dtype=dtype,
                                         gradient_checkpointing=gradient_checkpointing, place=place)
        self._owns_base = shared is None
        self.base_model = self.base.base_model
        self.lora = lora
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device, self.dtype = self.base.device, self.base.dtype
        self.tokenizer, self.vocab_size = self.base.tokenizer, self.base.vocab_size
        self.call_timeout_s = call_timeout_s
        self.step = 0
        self.grad_sync: Callable[[list[torch.Tensor]], None] | None = None
        """Run on the adapter's parameters at each optimizer step, before clipping: the
        data-parallel learner sums the ranks' gradients here (rlpipe.pipeline.distributed), so
        clipping and the step see the whole batch's gradient."""
        self.before_passes: Callable[[TrainingClient, int, bool, bool], None] | None = None
        """Run before each forward / forward_backward call's passes, given (this client, its
        micro-batch count, whether it computes reference logprobs, whether with gradients):
        the ranks of a sharded base (FSDP) gather each layer's weights in every pass, so they
        must all run as many passes, and rlpipe.pipeline.distributed adds passes without data
        here to a rank that has fewer."""
        self._sampler_versions = itertools.count(1)
        if self.base.softcap and layout == "varlen":
            raise ValueError(f"{self.base_model} soft-caps attention logits; the varlen layout cannot: use layout='rows'")
        self.adapter = self.base.run(self._attach, lora, layout, row_tokens, max_tokens_per_micro_batch)

    def _attach(self, lora: LoraConfig, layout, row_tokens, max_tokens) -> str:
        name = self.base.add_adapter(lora)
        self.model = self.base.model
        self._params = self.base.adapter_params(name)
        self.optimizer = self._new_optimizer()
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        auto_layout, auto_row = default_layout(self.device, softcap=bool(self.base.softcap))
        self.forward_pass = ForwardPass(
            self.model, pad_id=pad_id, layout=layout or auto_layout,
            row_tokens=auto_row if row_tokens is None else row_tokens, max_tokens=max_tokens,
        )
        return name

    # ------------------------------------------------------------------ plumbing

    def _submit(self, what: str, fn, *args) -> APIFuture:
        def call():
            self.base.activate(self.adapter)
            return fn(*args)

        return APIFuture(self.base.executor.submit(call), what, self.call_timeout_s)

    def _new_optimizer(self) -> torch.optim.AdamW:
        return torch.optim.AdamW(self._params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    def _micro_batches(self, data: list[Datum], temperature: float, with_ref: bool = False):
        """Yield (datum indices, their target logprobs end to end, their entropies, their
        reference logprobs or None) per micro-batch; the logprobs carry gradients when grad is
        enabled, so the caller can backward each one in turn."""
        tokens = [np.asarray(d.model_input.to_ints(), dtype=np.int64) for d in data]
        targets = [d.loss_fn_inputs["target_tokens"].to_numpy().astype(np.int64) for d in data]
        for batch in self.forward_pass.plan([len(t) for t in tokens]):
            ref = self.reference_logprobs(batch, tokens, targets, temperature) if with_ref else None
            logprobs, entropy = self.forward_pass.logprobs(batch, tokens, targets, temperature)
            yield batch.datums, logprobs, entropy, ref

    def reference_logprobs(self, batch, tokens, targets, temperature: float) -> torch.Tensor:
        """The base model's target logprobs, for the KL penalty: this very model with its LoRA
        switched off (no second copy of the weights). peft's disable_adapter switches off every
        adapter, so on a SharedBase this is the base for every client too."""
        with torch.no_grad(), self.model.disable_adapter():
            return self.forward_pass.logprobs(batch, tokens, targets, temperature)[0]

    def _logprobs(self, data: list[Datum], temperature: float, with_ref: bool = False):
        """Per-datum (target logprobs, entropies, reference logprobs or None), without gradients."""
        out = [[None] * len(data) for _ in range(3)]
        with torch.no_grad():
            for indices, *parts in self._micro_batches(data, temperature, with_ref):
                _scatter(out, parts, data, indices)
        return out

    def _loss(self, data, loss_fn, config, with_grad: bool) -> ForwardBackwardOutput:
        if loss_fn not in LOSSES:
            raise ValueError(f"unknown loss {loss_fn!r}; known losses: {', '.join(sorted(LOSSES))}")
        config = dict(config or {})
        temperature = float(config.pop("temperature", 1.0))
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not data and self.before_passes is not None:
            self.before_passes(self, 0, False, with_grad)
            return self._output(loss_fn, [], {})
        packing.check_data(data, self.vocab_size, LOSSES[loss_fn].required_inputs)
        inputs = [{name: t.to_torch().to(self.device) for name, t in d.loss_fn_inputs.items()} for d in data]
        batch_inputs = _cat(inputs, range(len(data)))
        # A KL penalty without given reference logprobs: this client computes them (the base).
        kl_coef = config.get("kl_coef", 0.0)
        with_ref = (isinstance(kl_coef, (int, float)) and kl_coef > 0 and "ref_logprobs" not in batch_inputs
                    and "kl_coef" in LOSSES[loss_fn].config_keys)
        placeholder = {"ref_logprobs": torch.zeros(len(batch_inputs["target_tokens"]))} if with_ref else {}
        check_inputs(loss_fn, batch_inputs | placeholder, config)  # before any gradient moves
        if self.before_passes is not None:
            self.before_passes(self, len(self.forward_pass.plan([d.model_input.length for d in data])), with_ref,
                               with_grad)
        if not with_grad:
            per_datum, entropy, ref = self._logprobs(data, temperature, with_ref)
        else:
            per_datum, entropy, ref = [[None] * len(data) for _ in range(3)]
            with self._grads_kept_on_error():
                for indices, lp, mb_entropy, mb_ref in self._micro_batches(data, temperature, with_ref):
                    # Losses are token sums, so the micro-batch losses add up to the batch loss
                    # and their gradients accumulate to the batch gradient exactly.
                    mb_inputs = _cat(inputs, indices) | ({"ref_logprobs": mb_ref} if with_ref else {})
                    loss, _ = compute_loss(loss_fn, lp, mb_inputs, config)
                    loss.backward()
                    _scatter((per_datum, entropy, ref), (lp.detach(), mb_entropy, mb_ref), data, indices)
        # Metrics (ratio statistics, ...) are over the whole batch, from the detached logprobs.
        if with_ref:
            batch_inputs["ref_logprobs"] = torch.cat(ref)
        _, metrics = compute_loss(loss_fn, torch.cat(per_datum), batch_inputs, config)
        metrics["entropy:mean"] = _counted_mean(torch.cat(entropy), batch_inputs.get("weights"))
        return self._output(loss_fn, per_datum, metrics)

    @staticmethod
    def _output(kind: str, per_datum: list[torch.Tensor], metrics: dict) -> ForwardBackwardOutput:
        outputs = [{"logprobs": TensorData.from_torch(lp.float())} for lp in per_datum]
        return ForwardBackwardOutput(loss_fn_output_type=kind, loss_fn_outputs=outputs, metrics=metrics)

    def _custom(self, data: list[Datum], fn: CustomLossFn) -> ForwardBackwardOutput:
        if self.before_passes is not None:
            raise NotImplementedError("custom losses on a sharded base (FSDP): the ranks could not match their passes")
        packing.check_data(data, self.vocab_size, ("target_tokens",))
        if len(self.forward_pass.plan([d.model_input.length for d in data])) == 1:
            per_datum = [None] * len(data)
            for indices, lp, _, _ in self._micro_batches(data, 1.0):
                for i, part in zip(indices, _split(lp, data, indices)):
                    per_datum[i] = part
            loss, metrics = _call_custom(fn, data, per_datum)
            loss.backward()
            return self._output("custom", per_datum, {"loss:sum": float(loss.detach()), **metrics})
        # Several micro-batches: fn sees all logprobs at once, so take its gradient with respect
        # to the logprobs first, then push that gradient through each micro-batch in turn (one
        # extra forward pass, as Tinker does for custom losses).
        leaves = [lp.requires_grad_() for lp in self._logprobs(data, 1.0)[0]]
        loss, metrics = _call_custom(fn, data, leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        with self._grads_kept_on_error():
            for indices, lp, _, _ in self._micro_batches(data, 1.0):
                grad = torch.cat([grads[i] if grads[i] is not None else torch.zeros_like(leaves[i]) for i in indices])
                lp.backward(grad)
        return self._output("custom", [lp.detach() for lp in leaves], {"loss:sum": float(loss.detach()), **metrics})

    def _grads_kept_on_error(self):
        """Gradients as they were before the call if a micro-batch fails halfway (a failed
        forward_backward must not leave part of its gradient behind)."""
        return _RestoreGrads(self._params)

    def _optim_step(self, params: AdamParams) -> OptimStepResponse:
        for group in self.optimizer.param_groups:
            group.update(
                lr=params.learning_rate, betas=(params.beta1, params.beta2),
                eps=params.eps, weight_decay=params.weight_decay,
            )
        if self.grad_sync is not None:
            self.grad_sync(self._params)
        max_norm = params.grad_clip_norm if params.grad_clip_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
        if grad_norm != grad_norm or grad_norm == float("inf"):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"gradient norm is {grad_norm}: step {self.step} skipped, gradients cleared")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return OptimStepResponse(step=self.step, metrics={"grad_norm:mean": grad_norm})

    def _adapter_files(self, dtype: torch.dtype | None = None) -> dict[str, bytes]:
        """The adapter as the two files of a PEFT adapter directory, in memory (weights in dtype,
        default as trained): what save_weights_for_sampler writes and the learner sends."""
        # save_embedding_layers=False: LoRA on lm_head must not drag the base lm_head along.
        state = get_peft_model_state_dict(self.model, adapter_name=self.adapter, save_embedding_layers=False)
        weights = save_safetensors({k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()},
                                   metadata={"format": "pt"})
        config = self.model.peft_config[self.adapter].to_dict()
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()} | {"inference_mode": True}
        return {checkpoint.ADAPTER_CONFIG: json.dumps(config, indent=2, default=str).encode(),
                checkpoint.ADAPTER_WEIGHTS: weights}

    def _save_state(self, name: str) -> SaveResponse:
        path = self.checkpoint_dir / "state" / checkpoint.check_name(name)
        checkpoint.write_adapter(path / "adapter", self._adapter_files())
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        torch.save(checkpoint.rng_state(), path / "rng.pt")
        checkpoint.write_meta(path, checkpoint.StateMeta(self.base_model, self.lora, self.step))
        return SaveResponse(path=str(path))

    def _load_state(self, path: str, with_optimizer: bool) -> LoadResponse:
        meta = checkpoint.read_meta(path)
        path = Path(path)
        if msgspec.structs.replace(meta.lora, seed=self.lora.seed) != self.lora:  # seed only sets the init
            raise ValueError(f"checkpoint {path} has LoRA config {meta.lora}, this client has {self.lora}")
        weights = load_file(path / "adapter" / checkpoint.ADAPTER_WEIGHTS, device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights, adapter_name=self.adapter)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {path} has weights this model lacks: {result.unexpected_keys[:3]}")
        self.optimizer = self._new_optimizer()
        if with_optimizer:
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
            checkpoint.set_rng_state(torch.load(path / "rng.pt", weights_only=False))
            self.step = meta.step
        return LoadResponse(path=str(path), step=meta.step)

    def _save_for_sampler(self, name: str) -> SaveResponse:
        path = self.checkpoint_dir / "sampler_weights" / checkpoint.check_name(name)
        checkpoint.write_adapter(path, self._adapter_files())
        return SaveResponse(path=str(path))

    # ------------------------------------------------------------------ public API

    def forward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None) -> APIFuture[ForwardBackwardOutput]:
        """Loss and per-datum logprobs without gradients; loss_fn_config as forward_backward takes it."""
        return self._submit("forward", self._loss, list(data), loss_fn, loss_fn_config, False)

    def forward_backward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None) -> APIFuture[ForwardBackwardOutput]:
        """Loss, per-datum logprobs and metrics; the gradient accumulates until optim_step.
        loss_fn_config holds the loss's keys (rlpipe.losses) and may hold "temperature"
        (divides the logits, to score samples drawn at that temperature). With "kl_coef" > 0
        and no "ref_logprobs" input, the client scores the targets under the base model itself
        (this model with the adapter switched off, micro-batch by micro-batch).
        Besides the loss's metrics: "entropy:mean", the learner's exact per-token entropy at
        that temperature over the tokens with weight > 0 (all tokens without weights)."""
        return self._submit("forward_backward", self._loss, list(data), loss_fn, loss_fn_config, True)

    def forward_backward_custom(self, data: list[Datum], fn: CustomLossFn) -> APIFuture[ForwardBackwardOutput]:
        """fn(data, logprobs) -> (loss, metrics): logprobs is one tensor per datum, with grad."""
        return self._submit("forward_backward_custom", self._custom, list(data), fn)

    def optim_step(self, adam_params: AdamParams) -> APIFuture[OptimStepResponse]:
        return self._submit("optim_step", self._optim_step, adam_params)

    def save_state(self, name: str) -> APIFuture[SaveResponse]:
        return self._submit("save_state", self._save_state, name)

    def load_state(self, path: str) -> APIFuture[LoadResponse]:
        """Weights only: the optimizer starts fresh and the step counter is kept."""
        return self._submit("load_state", self._load_state, str(path), False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadResponse]:
        return self._submit("load_state_with_optimizer", self._load_state, str(path), True)

    def save_weights_for_sampler(self, name: str) -> APIFuture[SaveResponse]:
        return self._submit("save_weights_for_sampler", self._save_for_sampler, name)

    def get_sampler_weights(self, dtype: torch.dtype | None = None) -> APIFuture[dict[str, bytes]]:
        """What save_weights_for_sampler would write, as {file name: bytes}, without the disk
        (weights in dtype, default float32 as trained): how the learner sends adapters."""
        return self._submit("get_sampler_weights", self._adapter_files, dtype)

    def save_weights_and_get_sampling_client(self, name: str | None = None, **sampler_options):
        from rlpipe.sampling import create_sampling_client

        name = name or f"sampler-{self.step:06d}-{next(self._sampler_versions)}"
        path = self.save_weights_for_sampler(name).result().path
        return create_sampling_client(self.base_model, model_path=path, policy_version=self.step, **sampler_options)

    def get_info(self) -> ModelInfo:
        return ModelInfo(
            base_model=self.base_model, lora=self.lora, vocab_size=self.vocab_size, step=self.step,
            trainable_params=sum(p.numel() for p in self._params),
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
        )

    def get_tokenizer(self):
        return self.tokenizer

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights by name (a copy), for tests and weight comparisons."""
        state = get_peft_model_state_dict(self.model, adapter_name=self.adapter, save_embedding_layers=False)
        return {k: v.detach().clone() for k, v in state.items()}

    # The _async variants submit now (so order is kept) and hand back the awaitable future.
    async def forward_async(self, *args, **kwargs) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(*args, **kwargs)

    async def forward_backward_async(self, *args, **kwargs) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(*args, **kwargs)

    async def forward_backward_custom_async(self, *args, **kwargs) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward_custom(*args, **kwargs)

    async def optim_step_async(self, *args, **kwargs) -> APIFuture[OptimStepResponse]:
        return self.optim_step(*args, **kwargs)

    async def save_state_async(self, *args, **kwargs) -> APIFuture[SaveResponse]:
        return self.save_state(*args, **kwargs)

    async def load_state_async(self, *args, **kwargs) -> APIFuture[LoadResponse]:
        return self.load_state(*args, **kwargs)

    async def load_state_with_optimizer_async(self, *args, **kwargs) -> APIFuture[LoadResponse]:
        return self.load_state_with_optimizer(*args, **kwargs)

    async def save_weights_for_sampler_async(self, *args, **kwargs) -> APIFuture[SaveResponse]:
        return self.save_weights_for_sampler(*args, **kwargs)

    def close(self) -> None:
        """Frees the adapter (and the base, if it is this client's own). Idempotent."""
        if self._owns_base:
            self.base.close()
        elif self.adapter is not None:
            self.base.run(self.base.remove_adapter, self.adapter)
        self.adapter = None
