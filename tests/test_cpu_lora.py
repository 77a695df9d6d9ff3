"""rlpipe's grouped LoRA ops for vLLM on CPU equal vLLM's own per-token ops.

The end-to-end checks (logprobs of vLLM with adapters against transformers + peft, mixed
batches of base and several adapters) are in tests/test_sampling_vllm.py and
tests/test_families_vllm.py, which run with these ops active in the engine."""

import importlib.metadata

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed")

from vllm.lora.ops.torch_ops import lora_ops as vllm_ops  # noqa: E402

from rlpipe.sampling import cpu_lora  # noqa: E402

SLOTS, T, IN, OUT, RANK = 4, 37, 48, 40, 8


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(T, IN, generator=g)
    a = torch.randn(SLOTS, 1, RANK, IN, generator=g)  # vLLM's stacked layout (slots, 1, out, in)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=g)
    indices = torch.randint(-1, SLOTS, (T,), generator=g)
    return inputs, a, b, indices


def test_shrink_equals_vllm_and_no_lora_gets_nothing(case):
    inputs, a, _, indices = case
    ours, theirs = torch.zeros(T, RANK), torch.zeros(T, RANK)
    cpu_lora.bgmv_shrink(inputs, a, ours, indices, 0.5)
    vllm_ops.bgmv_shrink(inputs, a, theirs, indices, 0.5)
    has = indices >= 0
    torch.testing.assert_close(ours[has], theirs[has])
    assert torch.all(ours[~has] == 0)  # vLLM's op wraps -1 to the last slot instead
    assert not torch.all(theirs[~has] == 0)


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_and_expand_slice_equal_vllm(case, add_inputs):
    _, _, b, indices = case
    x = torch.randn(T, RANK)
    has = indices >= 0
    start = torch.randn(T, OUT + 8)
    ours, theirs = start.clone(), start.clone()
    cpu_lora.bgmv_expand(x, b, ours, indices, add_inputs)
    vllm_ops.bgmv_expand(x, b, theirs, indices, add_inputs)
    torch.testing.assert_close(ours[has], theirs[has])
    ours, theirs = start.clone(), start.clone()
    cpu_lora.bgmv_expand_slice(x, b, ours, indices, 4, OUT, add_inputs)
    vllm_ops.bgmv_expand_slice(x, b, theirs, indices, 4, OUT, add_inputs)
    torch.testing.assert_close(ours[has], theirs[has])
    no_lora = ours[~has, 4 : 4 + OUT]  # the slice of tokens without an adapter: unchanged, or zero
    torch.testing.assert_close(no_lora, start[~has, 4 : 4 + OUT] if add_inputs else torch.zeros_like(no_lora))


def test_one_adapter_fast_path(case):
    inputs, a, _, _ = case
    indices = torch.full((T,), 2)
    ours, theirs = torch.zeros(T, RANK), torch.zeros(T, RANK)
    cpu_lora.bgmv_shrink(inputs, a, ours, indices)
    vllm_ops.bgmv_shrink(inputs, a, theirs, indices)
    torch.testing.assert_close(ours, theirs)


def test_plugin_is_registered_and_acts_only_when_asked(monkeypatch):
    plugins = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("rlpipe_cpu_lora") == "rlpipe.sampling.cpu_lora:register"
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    saved = {name: getattr(punica_cpu, name) for name in cpu_lora.REPLACEMENTS}
    saved_ops = {name: getattr(vllm_ops, name) for name in cpu_lora.REPLACEMENTS}
    try:
        monkeypatch.delenv(cpu_lora.ENV, raising=False)
        cpu_lora.register()
        assert punica_cpu.bgmv_shrink is saved["bgmv_shrink"]  # any other vLLM user: untouched
        monkeypatch.setenv(cpu_lora.ENV, "1")
        cpu_lora.register()
        assert punica_cpu.bgmv_shrink is cpu_lora.bgmv_shrink and vllm_ops.bgmv_expand is cpu_lora.bgmv_expand
    finally:
        for name in cpu_lora.REPLACEMENTS:
            setattr(punica_cpu, name, saved[name])
            setattr(vllm_ops, name, saved_ops[name])
