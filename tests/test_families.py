"""Test models of real families (rlpipe.testing.families): architecture, tying, tokenizer and chat
template, non-trivial logprobs; and the embedded tiny model left unchanged by the shared code.

Each family's model is built once per machine (a few seconds) and cached; no vLLM here."""

import hashlib

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlpipe.testing import embedded as tiny
from rlpipe.testing import families
from rlpipe.testing.families import FAMILIES, family_model_path

NAMES = sorted(FAMILIES)
CHAT = [
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "the answer 7"},
    {"role": "user", "content": "And 5 * 6?"},
    {"role": "assistant", "content": "so 30"},
]
# CHAT as each real family's template renders it (whitespace included).
LLAMA3 = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
CHATML = "<|im_start|>{}\n{}<|im_end|>\n"
GEMMA = "<start_of_turn>{}\n{}<end_of_turn>\n"
TURNS = [("user", "What is 3 + 4?"), ("assistant", "the answer 7"), ("user", "And 5 * 6?"), ("assistant", "so 30")]
GEMMA_RENDERED = "<bos>" + "".join(GEMMA.format(r.replace("assistant", "model"), c) for r, c in TURNS)
RENDERED = {
    "llama3": "<|begin_of_text|>" + "".join(LLAMA3.format(*t) for t in TURNS),
    "qwen2": CHATML.format("system", "You are a helpful assistant.") + "".join(CHATML.format(*t) for t in TURNS),
    "qwen3": "".join(CHATML.format(*t) for t in TURNS),
    "mistral": "<s>[INST] What is 3 + 4?[/INST] the answer 7</s>[INST] And 5 * 6?[/INST] so 30</s>",
    "gemma": GEMMA_RENDERED,
    "gemma2": GEMMA_RENDERED,
    "gemma3": GEMMA_RENDERED,
}


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def stop_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def saved_weight_names(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.slow
@pytest.mark.parametrize("family", NAMES)
def test_model_loads_as_its_family(family):
    fam = FAMILIES[family]
    model, tok = load(family_model_path(family))
    assert type(model).__name__ == fam.architecture
    assert model.config.head_dim >= 32  # vLLM's CPU attention has no kernel below 32
    assert 500 <= len(tok) <= model.config.vocab_size <= 1024
    assert model.config.vocab_size % fam.vocab_multiple == 0
    assert tok.eos_token == fam.roles["eos_token"] and tok.pad_token == fam.roles.get("pad_token")
    assert tok.bos_token == fam.roles.get("bos_token")
    bos_first = tok("3 + 4")["input_ids"][0] == tok.bos_token_id
    assert bos_first == fam.add_bos_token  # Llama-3 / Mistral / Gemma prepend bos, Qwen does not


@pytest.mark.slow
@pytest.mark.parametrize("family,tied", [(f, None) for f in NAMES] + [("qwen3", False), ("mistral", True)])
def test_tied_flag_is_honoured(family, tied):
    expect = FAMILIES[family].tied if tied is None else tied
    path = family_model_path(family, tied=tied)
    model, _ = load(path)
    assert model.config.tie_word_embeddings is expect
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is expect
    assert ("lm_head.weight" in saved_weight_names(path)) is not expect


@pytest.mark.parametrize("family", NAMES)
def test_chat_template_has_the_family_shape(family):
    fam = FAMILIES[family]
    model, tok = load(family_model_path(family))
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == RENDERED[family]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    for token in fam.special_tokens:  # each special token is one id, in the vocabulary and in the chat
        (token_id,) = tok(token, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(token_id) == token
        assert ids.count(token_id) == text.count(token)
    # every assistant turn ends with a token that stops generation (config / generation_config eos)
    stops = stop_ids(model)
    assert stops == set(tok.convert_tokens_to_ids(fam.stop_tokens))
    end = text.index("the answer 7") + len("the answer 7")
    after = tok(text[end:], add_special_tokens=False)["input_ids"][0]
    assert after in stops, (family, tok.convert_ids_to_tokens(after))


@pytest.mark.parametrize("family", NAMES)
def test_generation_prompt_ends_with_the_assistant_header(family):
    fam = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(family_model_path(family))
    prompt = tok.apply_chat_template(CHAT[:3], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(tok.apply_chat_template(CHAT[:3], tokenize=False))
    assert prompt.endswith(fam.assistant_header)
    ids = tok.apply_chat_template(CHAT[:3], add_generation_prompt=True)["input_ids"]
    header = tok(fam.assistant_header, add_special_tokens=False)["input_ids"]
    assert ids[-len(header):] == header
    if tok.bos_token is not None:
        assert ids.count(tok.bos_token_id) == 1  # the template's bos, not a second one from encoding


def test_system_turns_as_the_real_families_handle_them():
    system = [{"role": "system", "content": "Be brief."}, CHAT[0]]

    def render(family):
        tok = AutoTokenizer.from_pretrained(family_model_path(family))
        return tok.apply_chat_template(system, tokenize=False, add_generation_prompt=True)

    assert render("qwen3").startswith(CHATML.format("system", "Be brief."))
    assert "You are a helpful assistant." not in render("qwen2")  # the default only without a system turn
    assert render("llama3").startswith("<|begin_of_text|>" + LLAMA3.format("system", "Be brief."))
    assert render("mistral") == "<s>[INST] Be brief.\n\nWhat is 3 + 4?[/INST]"
    assert render("gemma3") == "<bos>" + GEMMA.format("user", "Be brief.\n\nWhat is 3 + 4?") + "<start_of_turn>model\n"
    for family in ("gemma", "gemma2"):
        with pytest.raises(Exception, match="System role not supported"):
            render(family)
    tok = AutoTokenizer.from_pretrained(family_model_path("qwen3"))
    no_think = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("family", NAMES)
def test_logprobs_are_far_from_uniform(family):
    """Random init gives near-uniform next-token distributions (std of the logprobs across the
    vocabulary ~0.2); the short pre-training must make them peaked, so logprob comparisons
    between the learner and the sampler mean something."""
    model, tok = load(family_model_path(family))
    ids = torch.randint(0, len(tok), (1, 64), generator=torch.Generator().manual_seed(0))
    chat = tok.apply_chat_template(CHAT[:3], add_generation_prompt=True, return_tensors="pt")["input_ids"]
    for x in (ids, chat):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
        assert logprobs.std(-1).mean() > 0.8
        assert logprobs.exp().max(-1).values.mean() > 20 / model.config.vocab_size
    # and the chat structure was learned: the answer to a question is followed by the end of turn
    out = model.generate(chat, max_new_tokens=16, do_sample=False)[0, chat.shape[1]:].tolist()
    assert set(out) & stop_ids(model), tok.decode(out)


def test_qwen3_0_6b_has_the_real_dimensions():
    tok, _, _ = families.family_tokenizer("qwen3")
    config = families.family_config("qwen3", tok, **families.QWEN3_0_6B)
    real = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=True,
                rms_norm_eps=1e-6)
    assert {k: getattr(config, k) for k in real} == real
    assert config.rope_parameters["rope_theta"] == 1e6 and str(config.dtype).endswith("bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert 590e6 < sum(p.numel() for p in model.parameters()) < 600e6  # 0.44B + 0.16B embedding, tied


def test_unknown_settings_and_families_are_refused():
    with pytest.raises(ValueError, match="unknown model family"):
        family_model_path("gpt2")
    with pytest.raises(ValueError, match="unknown family-model settings"):
        family_model_path("qwen3", hidden=64)


# sha256 of the embedded model's files as they ship (rlpipe/testing/embedded_model/); the
# tokenizer files and config are also what the recipe (build_tiny_model) makes, on any machine.
TINY_FILES = {
    "tokenizer.json": "e124d86d89c08afd1abee820e9c22f4e56d8cf4e569f852f8ef84e7c972404e1",
    "tokenizer_config.json": "d9a007d6e37cdd397531cba8fed25d3977f60127a08bcaa5b03c0b0a5d8c321e",
    "chat_template.jinja": "813ce55fe248e27e878eeddf8523d9425b58d413b5fd9809347780d2cf5f3cb7",
}
TINY_CONFIG = "9d6f915da31ec797944b0b8b07bb2560442bdd77a812bded7c36b220a0693fd0"


def test_embedded_model_ships_unchanged_and_its_tokenizer_is_the_recipes(tmp_path):
    shipped = tiny.default_model_path()
    assert shipped == tiny.EMBEDDED_DIR and tiny.default_model_path(train_steps=tiny.DEFAULTS["train_steps"]) == shipped
    assert hashlib.sha256((shipped / "model.safetensors").read_bytes()).hexdigest() == tiny.WEIGHTS_SHA256
    assert hashlib.sha256((shipped / "config.json").read_bytes()).hexdigest() == TINY_CONFIG
    for name, digest in TINY_FILES.items():
        assert hashlib.sha256((shipped / name).read_bytes()).hexdigest() == digest, name
    # the tokenizer as build_tiny_model makes it, with the shared train_tokenizer's defaults
    texts = tiny.corpus(4000, tiny.DEFAULTS["seed"])
    tiny.train_tokenizer(texts, tiny.DEFAULTS["vocab_size"]).save_pretrained(tmp_path)
    for name, digest in TINY_FILES.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest, name
    # other settings are still built by the recipe and cached
    assert tiny.default_model_path(train_steps=0).parent == tiny.cache_dir()
