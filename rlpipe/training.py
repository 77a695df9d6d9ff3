"""TrainingClient: the Tinker training primitives on a peft LoRA model.

Every call is queued on one worker thread per client, so calls run in the order they were
submitted and `forward_backward(...)`, `optim_step(...)` can be issued back to back, then
awaited. Gradients accumulate across forward_backward calls until optim_step.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from pathlib import Path
from typing import Callable

import msgspec
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlpipe import checkpoint, packing
from rlpipe.futures import APIFuture
from rlpipe.losses import LOSSES, compute_loss
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

# Fixed alpha, as in Tinker and "LoRA Without Regret": the effective scale is alpha/rank, so
# the optimal learning rate does not move much with rank.
LORA_ALPHA = 32
CustomLossFn = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def lora_target_modules(model: torch.nn.Module, lora: LoraConfig) -> list[str]:
    """Leaf names of the Linear layers LoRA goes on, found by where they sit in the model."""
    names: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "." not in name:
            continue
        parents, leaf = name.split(".")[:-1], name.rsplit(".", 1)[-1]
        if lora.train_attn and any("attn" in p or "attention" in p for p in parents):
            names.add(leaf)
        if lora.train_mlp and any(p in ("mlp", "feed_forward", "ffn") for p in parents):
            names.add(leaf)
    if lora.train_unembed:
        head = model.get_output_embeddings()
        names.update(n for n, m in model.named_modules() if m is head)
    if not names:
        raise ValueError("LoRA targets nothing: enable at least one of train_mlp, train_attn, train_unembed")
    return sorted(names)


class TrainingClient:
    def __init__(
        self,
        base_model: str,
        lora: LoraConfig,
        checkpoint_dir: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        pack: bool = True,
        max_row_tokens: int = 4096,
        call_timeout_s: float = 3600.0,
    ):
        if lora.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {lora.rank}")
        self.base_model = str(base_model)
        self.lora = lora
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        self.pack = pack
        self.max_row_tokens = max_row_tokens
        self.call_timeout_s = call_timeout_s
        self.step = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlpipe-train")
        self._sampler_versions = itertools.count(1)

        if not (Path(self.base_model) / "config.json").exists():
            raise FileNotFoundError(f"base_model {self.base_model!r} is not a local Hugging Face model directory")
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        base = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=self.dtype)
        self.vocab_size = base.get_output_embeddings().weight.shape[0]
        peft_config = PeftLoraConfig(
            r=lora.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
            target_modules=lora_target_modules(base, lora), bias="none",
        )
        if lora.seed is not None:
            torch.manual_seed(lora.seed)
        self.model = get_peft_model(base, peft_config).to(self.device)
        self.model.eval()  # no dropout anywhere: logprobs must match the sampler's
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._new_optimizer()
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # ------------------------------------------------------------------ plumbing

    def _submit(self, what: str, fn, *args) -> APIFuture:
        return APIFuture(self._executor.submit(fn, *args), what, self.call_timeout_s)

    def _new_optimizer(self) -> torch.optim.AdamW:
        return torch.optim.AdamW(self._params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    def _logprobs(self, data: list[Datum], temperature: float) -> list[torch.Tensor]:
        """Learner logprobs of each datum's target tokens, computed on packed rows."""
        tokens = [d.model_input.to_ints() for d in data]
        lengths = [len(t) for t in tokens]
        rows = packing.plan_rows(lengths, self.max_row_tokens, self.pack)
        batch = packing.build_batch(tokens, rows, self._pad_id, self.device)
        targets = torch.zeros_like(batch.input_ids)
        for r, row in enumerate(rows):
            for i, off in zip(row.datums, row.offsets):
                targets[r, off : off + lengths[i]] = data[i].loss_fn_inputs["target_tokens"].to_torch()
        logits = self.model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
        ).logits
        # bf16 logits would round logprobs far beyond the sampler mismatch we want to see.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return packing.unpack(token_logprobs, rows, lengths)

    def _loss(self, data, loss_fn, config, with_grad: bool) -> ForwardBackwardOutput:
        if loss_fn not in LOSSES:
            raise ValueError(f"unknown loss {loss_fn!r}; known losses: {', '.join(sorted(LOSSES))}")
        config = dict(config or {})
        temperature = float(config.pop("temperature", 1.0))
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        packing.check_data(data, self.vocab_size, LOSSES[loss_fn].required_inputs)
        with torch.set_grad_enabled(with_grad):
            per_datum = self._logprobs(data, temperature)
            names = data[0].loss_fn_inputs.keys()
            inputs = {
                name: torch.cat([d.loss_fn_inputs[name].to_torch() for d in data]).to(self.device)
                for name in names
            }
            loss, metrics = compute_loss(loss_fn, torch.cat(per_datum), inputs, config)
            if with_grad:
                loss.backward()
        return self._output(loss_fn, per_datum, metrics)

    @staticmethod
    def _output(kind: str, per_datum: list[torch.Tensor], metrics: dict) -> ForwardBackwardOutput:
        outputs = [{"logprobs": TensorData.from_torch(lp.float())} for lp in per_datum]
        return ForwardBackwardOutput(loss_fn_output_type=kind, loss_fn_outputs=outputs, metrics=metrics)

    def _custom(self, data: list[Datum], fn: CustomLossFn) -> ForwardBackwardOutput:
        packing.check_data(data, self.vocab_size, ("target_tokens",))
        per_datum = self._logprobs(data, 1.0)
        loss, metrics = fn(data, per_datum)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError("a custom loss function must return (scalar tensor, metrics dict)")
        loss.backward()
        return self._output("custom", per_datum, {"loss:sum": float(loss.detach()), **metrics})

    def _optim_step(self, params: AdamParams) -> OptimStepResponse:
        for group in self.optimizer.param_groups:
            group.update(
                lr=params.learning_rate, betas=(params.beta1, params.beta2),
                eps=params.eps, weight_decay=params.weight_decay,
            )
        max_norm = params.grad_clip_norm if params.grad_clip_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
        if grad_norm != grad_norm or grad_norm == float("inf"):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"gradient norm is {grad_norm}: step {self.step} skipped, gradients cleared")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return OptimStepResponse(step=self.step, metrics={"grad_norm:mean": grad_norm})

    def _save_state(self, name: str) -> SaveResponse:
        path = self.checkpoint_dir / "state" / checkpoint.check_name(name)
        self.model.save_pretrained(path / "adapter", save_embedding_layers=False)
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        torch.save(checkpoint.rng_state(), path / "rng.pt")
        checkpoint.write_meta(path, checkpoint.StateMeta(self.base_model, self.lora, self.step))
        return SaveResponse(path=str(path))

    def _load_state(self, path: str, with_optimizer: bool) -> LoadResponse:
        meta = checkpoint.read_meta(path)
        path = Path(path)
        if msgspec.structs.replace(meta.lora, seed=self.lora.seed) != self.lora:  # seed only sets the init
            raise ValueError(f"checkpoint {path} has LoRA config {meta.lora}, this client has {self.lora}")
        weights = load_file(path / "adapter" / "adapter_model.safetensors", device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
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
        # LoRA on lm_head must not drag the full base lm_head into the adapter.
        self.model.save_pretrained(path, save_embedding_layers=False)
        return SaveResponse(path=str(path))

    # ------------------------------------------------------------------ public API

    def forward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None) -> APIFuture[ForwardBackwardOutput]:
        """Loss and per-datum logprobs without gradients. loss_fn_config may hold
        "temperature" (divides the logits, to score samples drawn at that temperature)."""
        return self._submit("forward", self._loss, list(data), loss_fn, loss_fn_config, False)

    def forward_backward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None) -> APIFuture[ForwardBackwardOutput]:
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
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, save_embedding_layers=False).items()}

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
        self._executor.shutdown(wait=True)
