"""Each model family through the whole stack with the public API: a LoRA TrainingClient trains
two steps, its sampler adapter loads in stock peft and in vLLM, and the logprobs of all three agree.

One vLLM engine at a time (~20 s to start on CPU): each test shuts its family's engine down."""

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: vLLM family tests skipped")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from rlpipe import ServiceClient, types  # noqa: E402
from rlpipe.testing.families import FAMILIES, family_model_path  # noqa: E402
from rlpipe.sampling import create_sampling_client, get_engine, shutdown_engines  # noqa: E402
from rlpipe.sampling.vllm_support import lm_head_lora  # noqa: E402
from rlpipe.types import ModelInput, SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow  # processes, engines or servers: not in the quick tier (pytest -m "not slow")

ENGINE = dict(backend="vllm", max_lora_rank=8, max_model_len=512, kv_cache_memory_bytes=1 << 28)
CHATS = [
    [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "the answer 19"}],
    [{"role": "user", "content": "What is 3 * 4?"}, {"role": "assistant", "content": "so 12"},
     {"role": "user", "content": "And 5 - 6?"}, {"role": "assistant", "content": "result -1"}],
]


def datum(tokens):
    return types.Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def learner_logprobs(tc, sequences):
    out = tc.forward([datum(t) for t in sequences], "cross_entropy").result()
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


@torch.no_grad()
def peft_logprobs(base, adapter, sequences):
    """Stock transformers + peft, nothing from rlpipe. Eager attention: transformers' reference
    implementation (its sdpa path drops Gemma-2's attention soft-capping)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, adapter).eval()
    out = []
    for t in sequences:
        lp = torch.log_softmax(model(input_ids=torch.tensor([t])).logits[0, :-1].double(), -1)
        out.append(lp.gather(1, torch.tensor(t[1:])[:, None])[:, 0].numpy())
    return out


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def trained_client(base, tmp_path, train_unembed):
    """A rank-8 LoRA TrainingClient after two supervised steps on the family's chats."""
    tc = ServiceClient(checkpoint_dir=tmp_path / f"ckpt-{train_unembed}").create_lora_training_client(
        base_model=base, rank=8, seed=0, train_unembed=train_unembed)
    tok = tc.get_tokenizer()
    sequences = [tok.apply_chat_template(c)["input_ids"] for c in CHATS]
    before = learner_logprobs(tc, sequences)
    for _ in range(2):
        tc.forward_backward([datum(t) for t in sequences], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    state = tc.trainable_state()
    assert all(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)
    assert any("lm_head" in k for k in state) is train_unembed
    assert max_diff(before, learner_logprobs(tc, sequences)) > 0.1  # the adapter is far from zero
    return tc, sequences


def check_sampling(tc, base, adapter, family):
    tok = tc.get_tokenizer()
    prompt = tok.apply_chat_template(CHATS[1][:3], add_generation_prompt=True)["input_ids"]
    client = create_sampling_client(base, model_path=adapter, policy_version=1, **ENGINE)
    seqs = client.sample(ModelInput.from_ints(prompt), 4, SamplingParams(max_tokens=24, temperature=1.0, seed=0))
    seqs = seqs.result().sequences
    assert all(len(s.tokens) > 0 for s in seqs)
    scored = [lp[len(prompt) - 1:] for lp in learner_logprobs(tc, [prompt + s.tokens for s in seqs])]
    diff = max_diff([s.logprobs for s in seqs], scored)
    print(f"{family}: vLLM sampling vs learner max |d logprob| {diff:.2e}")
    assert diff <= 1e-3


# Every family as its small models ship (llama3, qwen2, qwen3 and the Gemmas tied; mistral
# untied), plus Qwen3 untied (the shape of Qwen3-8B); the embedded tiny Llama is untied too.
CASES = [(family, None) for family in sorted(FAMILIES)] + [("qwen3", False)]


@pytest.mark.parametrize("family,tied", CASES, ids=[f + ("-untied" if t is False else "") for f, t in CASES])
def test_family_trains_and_samples_through_peft_and_vllm(family, tied, tmp_path):
    base = str(family_model_path(family, tied=tied))
    tc, sequences = trained_client(base, tmp_path, train_unembed=True)
    try:
        adapter = tc.save_weights_for_sampler("v1").result().path
        # (1) the saved adapter is standard: stock peft gives the learner's logprobs
        assert max_diff(peft_logprobs(base, adapter, sequences), learner_logprobs(tc, sequences)) <= 1e-4
        if not lm_head_lora(base):
            # vLLM refuses the lm_head LoRA with a clear error and keeps serving (a run config
            # refuses learner.train_unembed = true up front): train without it
            with pytest.raises(ValueError, match="lm_head"):
                create_sampling_client(base, model_path=adapter, **ENGINE)
            assert get_engine(base, "vllm").alive
            tc.close()
            tc, sequences = trained_client(base, tmp_path, train_unembed=False)
            adapter = tc.save_weights_for_sampler("v1").result().path
        # (2) vLLM samples with the adapter, and its logprobs are the learner's
        check_sampling(tc, base, adapter, family)
    finally:
        tc.close()
        shutdown_engines(base)  # only this family's: other tests share the tiny model's engine
