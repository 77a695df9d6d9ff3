"""Renderers: chat messages <-> tokens, with the loss weights of supervised training.

A conversation is rendered message by message. Each message is a header (the role marker,
weight 0: the prompt a sampler is given) followed by a body (the content and the stop
token: exactly what a sampler produces for that turn). Tokenizing the pieces one by one,
instead of tokenizing the whole text and mapping weights back, makes every weight sit on a
token boundary by construction; `build_supervised_example` checks that the concatenation is
the same token sequence the whole conversation tokenizes to, and raises if a tokenizer
merges across a message boundary (the weights would then mean something else).

    renderer = get_renderer(tokenizer)          # chat template if it has one, else role-colon
    tokens, weights = renderer.build_supervised_example(messages, train_on="all_assistant")
    datum = conversation_to_datum(renderer, messages, "last_assistant")
    prompt = renderer.build_generation_prompt(messages)          # ModelInput for sampling
    params = SamplingParams(max_tokens=64, stop=renderer.stop_sequences)
    message, ended = renderer.parse_response(sampled_tokens)

Messages are dicts {"role": ..., "content": ...}; roles system/user/assistant/tool.
"""

from __future__ import annotations

from typing import Literal, Protocol

from rlpipe.datums import datum_from_tokens_weights
from rlpipe.types import Datum, ModelInput

TrainOn = Literal["last_assistant", "all_assistant", "all_tokens"]
TRAIN_ON = ("last_assistant", "all_assistant", "all_tokens")
Message = dict[str, str]
Example = tuple[list[int], list[float]]
"""(tokens, weights): one weight per token, 1.0 on the tokens to train on."""


class Renderer(Protocol):
    tokenizer: object
    stop_sequences: list[int] | list[str]
    """What ends an assistant turn: pass as SamplingParams(stop=...)."""

    def build_supervised_example(self, messages: list[Message], train_on: TrainOn = "last_assistant") -> Example: ...

    def build_generation_prompt(self, messages: list[Message]) -> ModelInput: ...

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]: ...


# --------------------------------------------------------------------------- shared helpers


def _check_messages(messages: list[Message]) -> None:
    if not messages:
        raise ValueError("no messages: a conversation needs at least one")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with str 'role' and 'content', got {m!r}")


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _assemble(tokenizer, pieces: list[tuple[str, str, str]], train_on: TrainOn, stop_token: int | None):
    """pieces: (role, header text, body text) per message -> (tokens, weights).

    A body's weight stops after the last stop token in it: anything a template puts after
    the end-of-turn token (a newline, say) is never produced by the sampler, so not trained."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    assistant = [i for i, (role, _, _) in enumerate(pieces) if role == "assistant"]
    if train_on != "all_tokens" and not assistant:
        raise ValueError(f"train_on={train_on!r} needs at least one assistant message")
    trained = set(assistant[-1:] if train_on == "last_assistant" else assistant)
    tokens: list[int] = []
    weights: list[float] = []
    for i, (_, header, body) in enumerate(pieces):
        head_ids, body_ids = _tokenize(tokenizer, header), _tokenize(tokenizer, body)
        if train_on == "all_tokens":
            head_w, body_w = [1.0] * len(head_ids), [1.0] * len(body_ids)
        else:
            head_w, body_w = [0.0] * len(head_ids), [float(i in trained)] * len(body_ids)
            if stop_token is not None and stop_token in body_ids:
                end = len(body_ids) - body_ids[::-1].index(stop_token)  # just past the last stop token
                body_w[end:] = [0.0] * (len(body_ids) - end)
        tokens += head_ids + body_ids
        weights += head_w + body_w
    whole = _tokenize(tokenizer, "".join(h + b for _, h, b in pieces))
    if whole != tokens:
        at = next((k for k, (a, b) in enumerate(zip(whole, tokens)) if a != b), min(len(whole), len(tokens)))
        raise ValueError(
            f"tokenizing message by message differs from tokenizing the whole conversation at token {at}: "
            "the tokenizer merges text across a message boundary, so loss weights cannot be placed exactly; "
            "use a template whose turns start and end with special tokens"
        )
    return tokens, weights


def conversation_to_datum(renderer: Renderer, messages: list[Message], train_on: TrainOn = "last_assistant",
                          max_length: int | None = None) -> Datum:
    """A cross-entropy Datum for one conversation (truncated to max_length tokens if given)."""
    tokens, weights = renderer.build_supervised_example(messages, train_on)
    if max_length is not None:
        tokens, weights = tokens[:max_length], weights[:max_length]
    return datum_from_tokens_weights(tokens, weights)


def get_renderer(tokenizer) -> Renderer:
    """The tokenizer's own chat template where it has one, else the role-colon format."""
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplateRenderer(tokenizer)
    return RoleColonRenderer(tokenizer)


# --------------------------------------------------------------------------- chat template


class ChatTemplateRenderer:
    """Renders through the tokenizer's own chat template (apply_chat_template).

    Message k's text is render(messages[:k+1]) minus render(messages[:k]); an assistant
    message's header is what add_generation_prompt adds. This needs a template where adding
    a message only appends text (true of most; templates that rewrite earlier turns, e.g.
    by dropping old reasoning, are refused with an error rather than mis-weighted)."""

    def __init__(self, tokenizer, stop_token_id: int | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: use RoleColonRenderer")
        self.tokenizer = tokenizer
        self.stop_token_id = tokenizer.eos_token_id if stop_token_id is None else stop_token_id
        if self.stop_token_id is None:
            raise ValueError("the tokenizer has no EOS token: pass stop_token_id (the end-of-turn token)")
        self.stop_sequences = [self.stop_token_id]

    def _render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        if not messages and not generation_prompt:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _pieces(self, messages: list[Message]) -> list[tuple[str, str, str]]:
        _check_messages(messages)
        pieces, before = [], ""
        for k, message in enumerate(messages):
            after = self._render(messages[: k + 1])
            if not after.startswith(before):
                raise ValueError(f"the chat template is not prefix-stable: adding message {k} "
                                 "changes the text of earlier ones")
            header = ""
            if message["role"] == "assistant":
                prompt = self._render(messages[:k], generation_prompt=True)
                if not (prompt.startswith(before) and after.startswith(prompt)):
                    raise ValueError(f"message {k}: the template's generation prompt is not a prefix "
                                     "of the rendered assistant turn")
                header = prompt[len(before) :]
            text = after[len(before) :]
            pieces.append((message["role"], header, text[len(header) :]))
            before = after
        return pieces

    def build_supervised_example(self, messages: list[Message], train_on: TrainOn = "last_assistant") -> Example:
        """tokens and one weight per token (1.0 on the trained tokens)."""
        return _assemble(self.tokenizer, self._pieces(messages), train_on, self.stop_token_id)

    def build_generation_prompt(self, messages: list[Message]) -> ModelInput:
        """The history plus the assistant header: what to sample the next assistant turn from."""
        _check_messages(messages)
        return ModelInput.from_ints(_tokenize(self.tokenizer, self._render(messages, generation_prompt=True)))

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        """(assistant message, ended): ended is False when no stop token came (cut at max_tokens)."""
        tokens = list(tokens)
        ended = self.stop_token_id in tokens
        if ended:
            tokens = tokens[: tokens.index(self.stop_token_id)]
        return {"role": "assistant", "content": self.tokenizer.decode(tokens)}, ended


# --------------------------------------------------------------------------- role-colon


class RoleColonRenderer:
    """Plain text for models without a chat template:

        System: ...\\n\\nUser: What is 2 + 2?\\n\\nAssistant: 4\\n\\n

    The header is "Assistant:", the body " 4\\n\\n"; a blank line ends a turn, so content
    must not contain one. The tokenizer's BOS token, if it has one, starts the conversation."""

    SEPARATOR = "\n\n"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_sequences = [self.SEPARATOR]

    def _pieces(self, messages: list[Message]) -> list[tuple[str, str, str]]:
        _check_messages(messages)
        pieces = []
        for k, message in enumerate(messages):
            if self.SEPARATOR in message["content"]:
                raise ValueError(f"message {k}: content contains a blank line, "
                                 "which ends a turn in the role-colon format")
            header = f"{message['role'].capitalize()}:"
            pieces.append((message["role"], header, f" {message['content']}{self.SEPARATOR}"))
        return pieces

    def _bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [bos] if bos is not None else []

    def build_supervised_example(self, messages: list[Message], train_on: TrainOn = "last_assistant") -> Example:
        tokens, weights = _assemble(self.tokenizer, self._pieces(messages), train_on, None)
        bos = self._bos()
        return bos + tokens, [float(train_on == "all_tokens")] * len(bos) + weights

    def build_generation_prompt(self, messages: list[Message]) -> ModelInput:
        _check_messages(messages)
        text = "".join(h + b for _, h, b in self._pieces(messages)) + "Assistant:"
        return ModelInput.from_ints(self._bos() + _tokenize(self.tokenizer, text))

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        """Content up to the blank line (or EOS); ended is False when neither came."""
        tokens = list(tokens)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        ended_by_eos = eos is not None and eos in tokens
        if ended_by_eos:
            tokens = tokens[: tokens.index(eos)]
        text = self.tokenizer.decode(tokens)
        ended = self.SEPARATOR in text
        text = text.split(self.SEPARATOR)[0].removeprefix(" ")
        return {"role": "assistant", "content": text}, ended or ended_by_eos
