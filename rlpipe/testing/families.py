"""Tiny random-init test models of the model families people post-train (Llama-3, Qwen2.5,
Qwen3, Mistral, Gemma), built locally: nothing is downloaded.

Each model has its family's architecture (config class, tied or untied embeddings, qkv bias,
q/k norm, sliding windows, soft-capping), and a tokenizer trained here (rlpipe.testing.embedded's BPE) with
the family's special tokens, bos/eos/pad roles and chat-template shape. It is pre-trained
briefly so that logprobs are far from uniform and a logprob comparison means something, and
saved as an ordinary Hugging Face directory.

    path = family_model_path("qwen3")                  # cached, built once (~5 s)
    path = family_model_path("qwen3", tied=False)      # the same family, untied embeddings
    path = family_model_path("qwen3", **QWEN3_0_6B)    # the real Qwen3-0.6B dimensions, random
                                                       # init, bf16: ~20 s, 1.2 GB
What vLLM 0.32 does with them on CPU (tests/test_families_vllm.py): all families run and match
transformers in fp32, but LoRA on lm_head only for llama3 and qwen3 (the others' vLLM classes
declare no lm_head LoRA), Gemma-2 only tied, and Gemma-2 matches only transformers' eager
attention (sdpa drops its attention soft-capping).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

from rlpipe.testing import embedded as tiny


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # the transformers model_type: AutoConfig / AutoModelForCausalLM pick the classes
    architecture: str  # the model class, as config.json names it (what vLLM dispatches on)
    tied: bool  # whether the real small model ties lm_head to the input embedding
    special_tokens: list[str]  # ids 0, 1, ... in this order
    roles: dict  # eos_token / pad_token / bos_token / unk_token, as the real tokenizer sets them
    stop_tokens: list[str]  # config / generation_config eos_token_id: where sampling stops
    chat_template: str
    assistant_header: str  # what add_generation_prompt=True ends with
    add_bos_token: bool = False  # the tokenizer prepends bos on every encode
    config: dict = dataclasses.field(default_factory=dict)  # architecture settings of the real family
    vocab_multiple: int = 1  # the real config pads vocab_size past the tokenizer (Qwen: to 128)
    sliding: bool = False  # sliding-window (local) layers alternate with global ones


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# ChatML. Qwen2.5 adds a default system turn; Qwen3 does not, and can close an empty think block.
QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# No generation prompt: the prompt ends with [/INST]; a system message goes into the first user turn.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "{{ message['content'] }}[/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] | trim }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Gemma 1 and 2 refuse a system turn; Gemma 3 folds it into the first user turn.
GEMMA_TURN = (
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ content | trim }}<end_of_turn>\n"
)
GEMMA_END = "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% set content = message['content'] %}"
    + GEMMA_TURN + GEMMA_END
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set content = message['content'] %}"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{% set content = messages[0]['content'] + '\\n\\n' + content %}{% endif %}"
    "{% if message['role'] != 'system' %}" + GEMMA_TURN + "{% endif %}" + GEMMA_END
)

_LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
_QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
_GEMMA_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_GEMMA_ROLES = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")

FAMILIES: dict[str, Family] = {
    # Llama-3.2-1B-Instruct: no pad token; the instruct config stops at end_of_text, eom and eot.
    "llama3": Family(
        "llama", "LlamaForCausalLM", True, _LLAMA3_TOKENS,
        dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None),
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], LLAMA3_TEMPLATE,
        "<|start_header_id|>assistant<|end_header_id|>\n\n", add_bos_token=True,
        config=dict(rms_norm_eps=1e-5, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=8192)),
    ),
    # Qwen2.5-0.5B-Instruct: q/k/v projections have a bias (always, in Qwen2's modeling code).
    "qwen2": Family(
        "qwen2", "Qwen2ForCausalLM", True, _QWEN_TOKENS,
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), ["<|im_end|>", "<|endoftext|>"],
        QWEN2_TEMPLATE, "<|im_start|>assistant\n",
        config=dict(rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
        vocab_multiple=128,
    ),
    # Qwen3-0.6B: RMSNorm on q and k per head, no bias.
    "qwen3": Family(
        "qwen3", "Qwen3ForCausalLM", True, _QWEN_TOKENS + ["<think>", "</think>"],
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), ["<|im_end|>", "<|endoftext|>"],
        QWEN3_TEMPLATE, "<|im_start|>assistant\n",
        config=dict(rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
        vocab_multiple=128,
    ),
    # Mistral-7B-Instruct-v0.3: untied, no sliding window, no pad token.
    "mistral": Family(
        "mistral", "MistralForCausalLM", False, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=None), ["</s>"],
        MISTRAL_TEMPLATE, "[/INST]", add_bos_token=True,
        config=dict(sliding_window=None, rms_norm_eps=1e-5,
                    rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    ),
    # gemma-2b-it: embeddings scaled by sqrt(hidden), (1 + w) RMSNorm, GeLU-tanh MLP.
    "gemma": Family(
        "gemma", "GemmaForCausalLM", True, _GEMMA_TOKENS, _GEMMA_ROLES, ["<eos>", "<end_of_turn>"],
        GEMMA_TEMPLATE, "<start_of_turn>model\n", add_bos_token=True, config=dict(rms_norm_eps=1e-6),
    ),
    # gemma-2-2b-it: + logit soft-capping, sliding-window layers alternating with full ones.
    "gemma2": Family(
        "gemma2", "Gemma2ForCausalLM", True, _GEMMA_TOKENS, _GEMMA_ROLES, ["<eos>", "<end_of_turn>"],
        GEMMA_TEMPLATE, "<start_of_turn>model\n", add_bos_token=True, sliding=True,
        config=dict(rms_norm_eps=1e-6, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    ),
    # gemma-3-1b-it (text only): + q/k norm, local and global rope bases, no soft-capping.
    "gemma3": Family(
        "gemma3_text", "Gemma3ForCausalLM", True, _GEMMA_TOKENS, _GEMMA_ROLES, ["<eos>", "<end_of_turn>"],
        GEMMA3_TEMPLATE, "<start_of_turn>model\n", add_bos_token=True, sliding=True, config=dict(rms_norm_eps=1e-6),
    ),
}

DEFAULTS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=None,  # None: hidden_size // num_attention_heads (vLLM on CPU needs >= 32)
    max_position_embeddings=1024,
    sliding_window=128,  # only for the families with sliding-window layers (gemma2, gemma3)
    vocab_size=None,  # None: the tokenizer's size, padded as the family pads it
    tokenizer_vocab=700,
    train_steps=60,  # 0: random init only; 60 steps take ~5 s on 2 CPU cores
    dtype="float32",
    seed=0,
)
# The real Qwen3-0.6B (its rope base, norm eps and tying are the qwen3 family's), random init.
QWEN3_0_6B = dict(
    hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, vocab_size=151936,
    train_steps=0, dtype="bfloat16",
)
VERSION = 1  # bump when a family, the corpus or the recipe changes, so caches rebuild


def conversations(n: int, seed: int) -> list[list[dict]]:
    """Generated one- and two-turn arithmetic chats (no system turn: Gemma 1/2 refuse it)."""
    rng = random.Random(seed)
    words = "the answer is sum so result".split()
    chats = []
    for _ in range(n):
        chat = []
        for _ in range(rng.randint(1, 2)):
            a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-*")
            chat += [{"role": "user", "content": f"What is {a} {op} {b}?"},
                     {"role": "assistant", "content": f"{rng.choice(words)} {eval(f'{a}{op}{b}')}"}]
        chats.append(chat)
    return chats


def babble(n: int, seed: int) -> list[str]:
    """Sentences of made-up words from a fixed set of syllables: enough distinct words for a
    BPE vocabulary of several hundred tokens."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    return [" ".join(rng.choice(lexicon) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def check_settings(dims: dict) -> dict:
    cfg = {**DEFAULTS, **dims}
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown family-model settings: {sorted(unknown)}")
    return cfg


def family_config(family: str, tokenizer, *, tied: bool | None = None, **dims):
    """The transformers config of a family's model with the given dims (see DEFAULTS), its
    token ids taken from tokenizer. tied: override the family's embedding tying."""
    from transformers import AutoConfig

    fam, cfg = FAMILIES[family], check_settings(dims)
    head_dim = cfg["head_dim"] or cfg["hidden_size"] // cfg["num_attention_heads"]
    extra = dict(fam.config)
    rope = extra.get("rope_parameters", {})
    if "original_max_position_embeddings" in rope:  # Llama-3's long-context rope: keep it below the context
        extra["rope_parameters"] = {**rope, "original_max_position_embeddings": min(
            rope["original_max_position_embeddings"], cfg["max_position_embeddings"] // 2)}
    if fam.sliding:  # local and global layers alternate, so that a short test covers both kinds
        kinds = ["sliding_attention", "full_attention"]
        extra.update(sliding_window=cfg["sliding_window"], query_pre_attn_scalar=head_dim,
                     layer_types=[kinds[i % 2] for i in range(cfg["num_hidden_layers"])])
    stop_ids = tokenizer.convert_tokens_to_ids(fam.stop_tokens)
    return AutoConfig.for_model(
        fam.model_type,
        **extra,
        vocab_size=cfg["vocab_size"] or -(-len(tokenizer) // fam.vocab_multiple) * fam.vocab_multiple,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=head_dim,
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=fam.tied if tied is None else tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        architectures=[fam.architecture],
        dtype=cfg["dtype"],
    )


def family_tokenizer(family: str, vocab_size: int = DEFAULTS["tokenizer_vocab"], seed: int = 0):
    """(tokenizer, plain texts, chats): a BPE tokenizer with the family's special tokens, roles
    and chat template, trained on generated text, and that text for pre-training."""
    fam = FAMILIES[family]
    chats = conversations(2000, seed)
    plain = [t for t in tiny.corpus(3000, seed) if not t.startswith("<|user|>")] + babble(2000, seed)
    contents = [" ".join(m["content"] for m in chat) for chat in chats]
    tokenizer = tiny.train_tokenizer(
        plain + contents + ["system user assistant model"], vocab_size, fam.special_tokens,
        **fam.roles, add_bos_token=fam.add_bos_token, chat_template=fam.chat_template,
    )
    return tokenizer, plain, chats


def build_family_model(family: str, out_dir: str | os.PathLike, *, tied: bool | None = None, **dims) -> Path:
    """Train a tokenizer, build (and briefly pre-train) a model of the family, save it to out_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = check_settings(dims)
    tokenizer, plain, chats = family_tokenizer(family, cfg["tokenizer_vocab"], cfg["seed"])
    config = family_config(family, tokenizer, tied=tied, **dims)
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg["dtype"]))
    if cfg["train_steps"]:
        # Plain text as a document (bos where the family adds one, then eos), chats exactly as
        # the template renders them (their turns already end with the end-of-turn token).
        ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in plain]
        ids += [tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]
                for c in chats]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tiny.pretrain_on_ids(model, ids, pad, cfg["train_steps"], cfg["seed"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "rlpipe_family.json").write_text(
        json.dumps({"family": family, "tied": tied, "version": VERSION, **cfg}, indent=1))
    return out


def family_model_path(family: str, tied: bool | None = None, **dims) -> Path:
    """A family's test model, built once per machine and settings under rlpipe.testing.embedded.cache_dir()."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    key = {**check_settings(dims), "family": family, "tied": tied, "version": VERSION}
    return tiny.cached_build(family, key, lambda out: build_family_model(family, out, tied=tied, **dims))
