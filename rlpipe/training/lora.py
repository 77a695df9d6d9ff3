"""Where LoRA goes on a model, and SharedBase: one base model in memory carrying many adapters.

Targets are found by where a Linear layer sits in the model (under an attention, MLP or the
output head), so a new architecture needs no table of module names.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlpipe.training import attention
from rlpipe.training.api_future import CallTimeout
from rlpipe.training.forward import enable_gradient_checkpointing
from rlpipe.types import LoraConfig

# Fixed alpha, as in Tinker and "LoRA Without Regret": the effective scale is alpha/rank, so
# the optimal learning rate does not move much with rank.
LORA_ALPHA = 32
log = logging.getLogger(__name__)


def target_groups(model: torch.nn.Module) -> dict[str, set[str]]:
    """Leaf names of the Linear layers LoRA can go on, by group ("attn", "mlp", "unembed"),
    found by where they sit in the (unwrapped) model."""
    groups: dict[str, set[str]] = {"attn": set(), "mlp": set(), "unembed": set()}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "." not in name:
            continue
        parents, leaf = name.split(".")[:-1], name.rsplit(".", 1)[-1]
        if any("attn" in p or "attention" in p for p in parents):
            groups["attn"].add(leaf)
        if any(p in ("mlp", "feed_forward", "ffn") for p in parents):
            groups["mlp"].add(leaf)
    head = model.get_output_embeddings()
    groups["unembed"].update(n for n, m in model.named_modules() if m is head)
    return groups


def lora_targets(groups: dict[str, set[str]], lora: LoraConfig) -> list[str]:
    names = set()
    for group, wanted in (("attn", lora.train_attn), ("mlp", lora.train_mlp), ("unembed", lora.train_unembed)):
        if wanted:
            names |= groups[group]
    if not names:
        raise ValueError("LoRA targets nothing: enable at least one of train_mlp, train_attn, train_unembed")
    return sorted(names)


def tied_embeddings(model: torch.nn.Module) -> bool:
    """Whether lm_head shares its weight with the input embedding (Qwen3-0.6B..4B, Llama-3.2-1B/3B,
    Gemma). LoRA on a tied lm_head is still sound: the delta B·A applies to the output projection
    only, the shared base weight stays frozen, and peft and vLLM both load such an adapter."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


class SharedBase:
    """One base model in memory, shared by every training client (LoRA adapter) made on it:
    many users' adapters cost their LoRA weights and optimizer state, not a copy of the base.

    All work on the model runs on one thread, so the clients' calls interleave but never
    overlap, each in its own client's order; every call first makes its client's adapter the
    active one. The other adapters' gradients stay where they are until their own optim_step."""

    def __init__(self, base_model: str, *, device: str | None = None, dtype: str | None = None,
                 gradient_checkpointing: bool = False, place: Callable[[torch.nn.Module], None] | None = None):
        """device: default cuda where available, else cpu. dtype: of the base weights, default
        bfloat16 on CUDA and float32 elsewhere; LoRA weights and optimizer state stay float32.
        gradient_checkpointing: recompute each decoder layer in backward (less memory, ~30% more compute).
        place: puts the model, with its first adapter, on the device instead of model.to(device):
        the FSDP learner shards the base there (rlpipe/pipeline/distributed.py), so no device
        ever holds the whole base."""
        self.base_model = str(base_model)
        if not (Path(self.base_model) / "config.json").exists():
            raise FileNotFoundError(f"base_model {self.base_model!r} is not a local Hugging Face model directory")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        self.gradient_checkpointing = gradient_checkpointing
        self.place = place
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        config = AutoConfig.from_pretrained(self.base_model)
        self.softcap = attention.attention_softcap(config)
        self._base = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=self.dtype, **attention.load_options(config))
        self.vocab_size = self._base.get_output_embeddings().weight.shape[0]
        self.tied = tied_embeddings(self._base)
        self.targets = target_groups(self._base)
        self.model = None  # the PeftModel, once the first adapter is added
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlpipe-train")
        self._names = itertools.count()

    def run(self, fn, *args, timeout_s: float = 3600.0):
        """fn(*args) on the model's thread, waited for (behind every call queued before it)."""
        future = self.executor.submit(fn, *args)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise
            raise CallTimeout(f"the model thread of {self.base_model} did not run {fn.__name__} within {timeout_s:.0f} s") from None

    def add_adapter(self, lora: LoraConfig) -> str:
        """A new LoRA adapter on the model, initialised from lora.seed; its name. Model thread only."""
        if lora.train_unembed and self.tied:
            log.info("%s ties its embeddings: LoRA on lm_head trains the output projection only", self.base_model)
        config = PeftLoraConfig(r=lora.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                target_modules=lora_targets(self.targets, lora), bias="none")
        n = next(self._names)
        name = "default" if n == 0 else f"adapter{n}"
        if lora.seed is not None:
            torch.manual_seed(lora.seed)
        with warnings.catch_warnings():
            # peft warns about LoRA on a tied lm_head; see tied_embeddings() for why it is sound here.
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            if self.model is None:
                # autocast_adapter_dtype: LoRA weights (and so Adam's state) in float32 over a bf16 base.
                self.model = get_peft_model(self._base, config, adapter_name=name, autocast_adapter_dtype=True)
                if self.place is not None:
                    self.place(self.model)
                else:
                    self.model.to(self.device)
                self.model.eval()  # no dropout anywhere: logprobs must match the sampler's
                if self.gradient_checkpointing:
                    enable_gradient_checkpointing(self.model)
            else:
                if self.place is not None:
                    raise ValueError("a sharded base carries one adapter: its ranks must run the same passes")
                self.model.add_adapter(name, config, autocast_adapter_dtype=True)
                self.model.to(self.device)
        self.activate(name)
        return name

    def activate(self, name: str) -> None:
        if self.model.active_adapter != name:
            self.model.set_adapter(name)

    def adapter_params(self, name: str) -> list[torch.Tensor]:
        return [p for n, p in self.model.named_parameters() if f".{name}." in n]

    def remove_adapter(self, name: str) -> None:
        """Model thread only."""
        for p in self.adapter_params(name):
            p.grad = None
        if len(self.model.peft_config) > 1:
            self.model.delete_adapter(name)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
