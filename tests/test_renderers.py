"""Renderers on the tiny model's real tokenizer: weights sit exactly on the intended tokens."""

import copy

import pytest
from transformers import AutoTokenizer

from rlpipe.renderers import ChatTemplateRenderer, RoleColonRenderer, conversation_to_datum, get_renderer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "3 + 4 = 7"},
    {"role": "user", "content": "And 7 + 1?"},
    {"role": "assistant", "content": "7 + 1 = 8"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def weighted_spans(tokens, weights):
    """The maximal runs of weight-1 tokens, as token lists."""
    spans, run = [], []
    for t, w in zip(tokens, weights):
        if w == 1.0:
            run.append(t)
        elif run:
            spans.append(run)
            run = []
    return spans + ([run] if run else [])


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_concatenation_equals_whole_conversation(tokenizer):
    tokens, weights = ChatTemplateRenderer(tokenizer).build_supervised_example(CHAT, "all_assistant")
    whole = encode(tokenizer, tokenizer.apply_chat_template(CHAT, tokenize=False))
    assert tokens == whole
    assert len(weights) == len(tokens)


@pytest.mark.parametrize("train_on", ["last_assistant", "all_assistant"])
def test_weights_cover_exactly_the_assistant_bodies(tokenizer, train_on):
    tokens, weights = ChatTemplateRenderer(tokenizer).build_supervised_example(CHAT, train_on)
    answers = [m["content"] for m in CHAT if m["role"] == "assistant"]
    if train_on == "last_assistant":
        answers = answers[-1:]
    # content and the end-of-turn token, nothing of the role header
    assert weighted_spans(tokens, weights) == [encode(tokenizer, a) + [tokenizer.eos_token_id] for a in answers]
    assistant_header = tokenizer.convert_tokens_to_ids("<|assistant|>")
    for i, w in enumerate(weights):
        if w == 1.0 and weights[i - 1] == 0.0:
            assert tokens[i - 1] == assistant_header
    assert set(weights) == {0.0, 1.0}


def test_all_tokens(tokenizer):
    tokens, weights = ChatTemplateRenderer(tokenizer).build_supervised_example(CHAT, "all_tokens")
    assert weights == [1.0] * len(tokens)


def test_generation_prompt_plus_answer_is_the_rendered_conversation(tokenizer):
    # Token-in/token-out: what the sampler is given plus what it produces is what we train on.
    renderer = ChatTemplateRenderer(tokenizer)
    tokens, weights = renderer.build_supervised_example(CHAT, "last_assistant")
    prompt = renderer.build_generation_prompt(CHAT[:-1]).to_ints()
    answer = weighted_spans(tokens, weights)[0]
    assert prompt + answer == tokens
    assert weights == [0.0] * len(prompt) + [1.0] * len(answer)


def test_parse_response_round_trip(tokenizer):
    renderer = ChatTemplateRenderer(tokenizer)
    answer = encode(tokenizer, "7 + 1 = 8") + [tokenizer.eos_token_id]
    assert renderer.parse_response(answer) == ({"role": "assistant", "content": "7 + 1 = 8"}, True)
    assert renderer.parse_response(answer[:-1]) == ({"role": "assistant", "content": "7 + 1 = 8"}, False)
    # anything after the stop token is not part of the message
    assert renderer.parse_response(answer + encode(tokenizer, "junk"))[0]["content"] == "7 + 1 = 8"
    assert renderer.stop_sequences == [tokenizer.eos_token_id]


def test_datum_is_shifted(tokenizer):
    renderer = ChatTemplateRenderer(tokenizer)
    tokens, weights = renderer.build_supervised_example(CHAT, "all_assistant")
    datum = conversation_to_datum(renderer, CHAT, "all_assistant")
    assert datum.model_input.to_ints() == tokens[:-1]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == tokens[1:]
    assert datum.loss_fn_inputs["weights"].tolist() == weights[1:]
    assert conversation_to_datum(renderer, CHAT, "all_assistant", max_length=10).model_input.length == 9


def test_trailing_template_text_after_stop_token_is_not_trained(tokenizer):
    # A template that puts a newline after each end-of-turn token (as many real ones do):
    # the sampler stops at the end token and never produces the newline, so it gets weight 0.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tokenizer.chat_template.replace("<|end|>", "<|end|>\n")
    tokens, weights = ChatTemplateRenderer(tok).build_supervised_example(CHAT[:3], "last_assistant")
    assert tokens == encode(tok, tok.apply_chat_template(CHAT[:3], tokenize=False))
    assert weighted_spans(tokens, weights) == [encode(tok, "3 + 4 = 7") + [tok.eos_token_id]]
    assert tok.decode(tokens[-1:]) == "\n" and weights[-1] == 0.0


def test_refuses_what_it_cannot_weight_exactly(tokenizer):
    renderer = ChatTemplateRenderer(tokenizer)
    with pytest.raises(ValueError, match="train_on"):
        renderer.build_supervised_example(CHAT, "everything")
    with pytest.raises(ValueError, match="assistant"):
        renderer.build_supervised_example(CHAT[:2], "last_assistant")
    with pytest.raises(ValueError, match="role"):
        renderer.build_supervised_example([{"content": "hi"}])
    # A template that rewrites earlier turns (here: only the last message keeps its text).
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>"
                         "{{ m['content'] if loop.last else '' }}<|end|>{% endfor %}")
    with pytest.raises(ValueError, match="prefix-stable"):
        ChatTemplateRenderer(tok).build_supervised_example(CHAT[1:3])
    # A template without separators lets BPE merge "Wh" + "at" into one token across turns.
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert len(encode(tok, "What")) < len(encode(tok, "Wh") + encode(tok, "at"))
    with pytest.raises(ValueError, match="message boundary"):
        ChatTemplateRenderer(tok).build_supervised_example(
            [{"role": "user", "content": "Wh"}, {"role": "assistant", "content": "at"}])


def test_role_colon_renderer(tokenizer):
    renderer = RoleColonRenderer(tokenizer)
    tokens, weights = renderer.build_supervised_example(CHAT, "all_assistant")
    assert tokenizer.decode(tokens) == (
        "System: You are terse.\n\nUser: What is 3 + 4?\n\nAssistant: 3 + 4 = 7\n\n"
        "User: And 7 + 1?\n\nAssistant: 7 + 1 = 8\n\n"
    )
    assert [tokenizer.decode(s) for s in weighted_spans(tokens, weights)] == [" 3 + 4 = 7\n\n", " 7 + 1 = 8\n\n"]
    assert tokens == encode(tokenizer, tokenizer.decode(tokens))  # concatenation property
    last, last_w = renderer.build_supervised_example(CHAT, "last_assistant")
    assert [tokenizer.decode(s) for s in weighted_spans(last, last_w)] == [" 7 + 1 = 8\n\n"]
    prompt = renderer.build_generation_prompt(CHAT[:-1]).to_ints()
    assert tokenizer.decode(prompt).endswith("User: And 7 + 1?\n\nAssistant:")
    answer = last[len(prompt):]
    assert prompt + answer == last
    assert renderer.parse_response(answer) == ({"role": "assistant", "content": "7 + 1 = 8"}, True)
    assert renderer.parse_response(answer[:-2]) == ({"role": "assistant", "content": "7 + 1 = 8"}, False)
    assert renderer.stop_sequences == ["\n\n"]
    with pytest.raises(ValueError, match="blank line"):
        renderer.build_supervised_example([{"role": "assistant", "content": "a\n\nb"}])


def test_get_renderer_picks_by_chat_template(tokenizer):
    assert isinstance(get_renderer(tokenizer), ChatTemplateRenderer)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    assert isinstance(get_renderer(tok), RoleColonRenderer)
