"""The learner's forward pass: datums in, one logprob per target token out.

The model is run as its decoder body, then the output head chunk by chunk: each chunk's
full-vocabulary logits are reduced to the target logprob (logit - logsumexp) at once, and
under gradients the chunk is checkpointed, so backward recomputes its logits instead of
keeping them. Peak memory for logits is one chunk, not the batch (with a 150k vocabulary a
4k-token micro-batch would otherwise hold 2.4 GB of fp32 logits).

The same chunk also gives each token's exact entropy (of the distribution at the sampling
temperature), detached: a diagnostic that costs a few elementwise passes over logits the
chunk holds anyway, never a tensor of the batch's full logits.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from rlpipe.training import attention, packing

log = logging.getLogger(__name__)

LOGITS_BUDGET_BYTES = 64 << 20
"""fp32 logits per chunk; below it the head runs in one piece without recomputation."""


def default_layout(device: torch.device, softcap: bool = False) -> tuple[str, int]:
    """(layout, row_tokens) per device, from benchmarks/bench_training.py: on CPU rows of
    64 tokens (short RL datums pack a few to a row; a longer datum sets the row width);
    on CUDA the flash varlen kernel where torch has it and the model does not soft-cap
    attention logits."""
    if device.type == "cuda" and attention.cuda_varlen_available() and not softcap:
        return "varlen", 0
    return "rows", 64


class ForwardPass:
    def __init__(self, model, *, pad_id: int, layout: str, row_tokens: int, max_tokens: int):
        """model: the peft model. max_tokens: micro-batch budget in tensor tokens (0: none)."""
        if layout not in packing.LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {packing.LAYOUTS}")
        self.model = model
        self.base = model.get_base_model()
        self.body = self.base.get_decoder()
        self.head = self.base.get_output_embeddings()
        self.softcap = getattr(self.base.config, "final_logit_softcapping", None)
        self.pad_id = pad_id
        self.layout = layout
        self.row_tokens = row_tokens
        self.max_tokens = max_tokens
        self.device = next(model.parameters()).device
        self.vocab_size = self.head.weight.shape[0]
        if layout == "varlen" and self.device.type == "cuda" and not attention.varlen_matches_sdpa(self.device, self.base.dtype):
            log.warning("varlen attention does not match sdpa on %s: using the rows layout", self.device)
            self.layout, self.row_tokens = "rows", max(row_tokens, 256)
        if self.layout == "varlen":
            self.body.config._attn_implementation = attention.register()
        self.split_head = self._head_matches_model()

    def plan(self, lengths: list[int]) -> list[packing.MicroBatch]:
        return packing.plan(lengths, self.layout, row_tokens=self.row_tokens, max_tokens=self.max_tokens)

    def logprobs(self, batch: packing.MicroBatch, tokens: list[np.ndarray], targets: list[np.ndarray],
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(target logprobs, entropies) of the micro-batch's real tokens, datum after datum
        (batch.datums order). The logprobs carry gradients when grad is enabled; the entropies
        never do."""
        x = packing.build(batch, tokens, targets, self.pad_id, self.device, varlen=self.layout == "varlen")
        kwargs = {}
        if x.cu_seqlens is not None:
            kwargs = dict(cu_seq_lens_q=x.cu_seqlens, cu_seq_lens_k=x.cu_seqlens, max_length_q=x.max_len, max_length_k=x.max_len)
        if not self.split_head:
            logits = self.model(input_ids=x.input_ids, position_ids=x.position_ids, use_cache=False, **kwargs).logits
            return self._target_logprobs(logits.flatten(0, 1)[x.index], x.targets, temperature, head=False)
        hidden = self.body(input_ids=x.input_ids, position_ids=x.position_ids, use_cache=False, **kwargs).last_hidden_state
        hidden = hidden.flatten(0, 1)[x.index]
        chunk = max(1, LOGITS_BUDGET_BYTES // (4 * self.vocab_size))
        if len(hidden) <= chunk:
            return self._target_logprobs(hidden, x.targets, temperature)
        logprobs, entropies = [], []
        for start in range(0, len(hidden), chunk):
            h, t = hidden[start : start + chunk], x.targets[start : start + chunk]
            if torch.is_grad_enabled():
                # Backward runs the chunk again to recompute its logits; only this first call's
                # outputs are kept, so each entropy is counted once.
                lp, entropy = checkpoint(self._target_logprobs, h, t, temperature, use_reentrant=False)
            else:
                lp, entropy = self._target_logprobs(h, t, temperature)
            logprobs.append(lp)
            entropies.append(entropy)
        return torch.cat(logprobs), torch.cat(entropies)

    def _target_logprobs(self, x: torch.Tensor, targets: torch.Tensor, temperature: float,
                         head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(x) if head else x
        # bf16 logits would round logprobs far beyond the sampler mismatch we want to see.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if head and self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if temperature != 1.0:
            logits = logits / temperature
        logsumexp = torch.logsumexp(logits, dim=-1)
        with torch.no_grad():  # H = logsumexp - sum(p * logits), with one temporary of the chunk's size
            entropy = logsumexp - torch.softmax(logits, dim=-1).mul_(logits).sum(-1)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logsumexp, entropy

    def _head_matches_model(self) -> bool:
        """Body + head must give the model's own logits; a family that does more to its logits
        than final softcapping falls back to the whole model (full logits in memory)."""
        ids = torch.arange(min(8, self.vocab_size), device=self.device)[None] % self.vocab_size
        with torch.no_grad():
            want = self.model(input_ids=ids, use_cache=False).logits.float()
            got = self.head(self.body(input_ids=ids, use_cache=False).last_hidden_state).float()
            if self.softcap:
                got = torch.tanh(got / self.softcap) * self.softcap
        if torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6):
            return True
        log.warning("%s: the output head alone does not reproduce the model's logits; using full-vocabulary "
                    "logits for the whole micro-batch (more memory)", type(self.base).__name__)
        return False


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers checkpoints a layer only in training mode, but the learner keeps the model in
    # eval mode (no dropout: its logprobs must match the sampler's). Mark just the layers as
    # training; their submodules, where dropout would act, stay in eval mode.
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True
