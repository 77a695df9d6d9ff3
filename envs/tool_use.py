"""Multi-turn tool use: the model calls tools, reads their results, then answers.

Format the model is taught by the system prompt (one call per turn; only the first call of
a turn runs):

    <tool_call>{"name": "calculator", "arguments": {"expression": "48293 * 1207"}}</tool_call>
    <answer>58289651</answer>

Each tool result comes back as a tool turn rendered by the tokenizer's own chat template
(`<|tool|>result<|end|><|assistant|>` for the embedded model); its tokens are appended to the
history, which is never re-tokenized. A malformed turn (bad JSON, unknown tool, wrong
arguments, neither a call nor an answer) gets an error message as its tool result, so the
model sees what went wrong; it costs the format term. The episode ends at the answer or
after max_turns turns (then with reward 0).

Reward = 1 for a correct answer (numbers compared by value, text after normalisation)
+ format_bonus (default 0.1) if the episode answered in <answer> tags without a malformed turn.
Tools: calculator (an ast-walking evaluator, no eval), python (envs.sandbox), search
(BM25 over envs/data/search_docs.jsonl, envs.search).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from envs.gsm8k import NUMBER_RE, parse_number, read_jsonl
from envs.sandbox import SandboxLimits, run_python
from envs.search import DOCS_PATH, BM25Index
from rlpipe.env import StepResult
from rlpipe.renderers import ChatTemplateRenderer
from rlpipe.types import ModelInput

TASKS_PATH = Path(__file__).parent / "data" / "tool_use_tasks.jsonl"
FORMAT_BONUS = 0.1

# --------------------------------------------------------------------------- chat rendering

_SENTINEL = "\u2063rlpipe-sentinel\u2063"


def neutralize_special_tokens(tokenizer, text: str) -> str:
    """Break up special-token strings (e.g. "<|end|>") in tool output or other outside text,
    so that a program printing "<|end|>" cannot end a turn or forge a role header."""
    specials = {*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values())}
    for token in sorted(specials, key=len, reverse=True):
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


def next_turn_tokens(tokenizer, messages: list[dict], action: list[int]) -> list[int]:
    """The tokens to append after an assistant action: `messages` (tool results, the other
    player's move, ...) as the chat template renders them after an assistant turn, then the
    next assistant header. EOS first if the action did not end its turn (it hit max_tokens)."""
    messages = [{**m, "content": neutralize_special_tokens(tokenizer, m["content"])} for m in messages]
    history = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(history + messages, add_generation_prompt=True, tokenize=False)
    end, eos = text.index(_SENTINEL) + len(_SENTINEL), tokenizer.eos_token
    if not text.startswith(eos, end):
        raise ValueError(f"the chat template does not end an assistant turn with EOS {eos!r}; "
                         "turns cannot be appended token-exactly")
    suffix = tokenizer(text[end + len(eos):], add_special_tokens=False)["input_ids"]
    closed = bool(action) and action[-1] == tokenizer.eos_token_id
    return suffix if closed else [tokenizer.eos_token_id, *suffix]


# --------------------------------------------------------------------------- calculator


class ToolError(Exception):
    """A tool could not serve a call because of the call itself; the model sees the message."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "log": math.log,
              "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
              "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION_CHARS = 300
MAX_INT_BITS = 4096


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression by walking its ast: numbers, + - * / // % **,
    parentheses, the functions in _FUNCTIONS and pi, e. Anything else raises ToolError."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        return _evaluate(tree.body)
    except SyntaxError as err:
        raise ToolError(f"not an arithmetic expression: {err.msg}") from None
    except (ArithmeticError, ValueError, TypeError, RecursionError) as err:
        raise ToolError(f"{type(err).__name__}: {err}") from None


def _evaluate(node: ast.AST) -> int | float:
    match node:
        case ast.Constant(value=value) if type(value) in (int, float):
            return value
        case ast.Name(id=name) if name in _CONSTANTS:
            return _CONSTANTS[name]
        case ast.UnaryOp(op=op, operand=operand) if type(op) in _UNARY:
            return _UNARY[type(op)](_evaluate(operand))
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY:
            a, b = _evaluate(left), _evaluate(right)
            if isinstance(op, ast.Pow) and abs(b) > 1 and abs(a) > 1 and abs(b) * math.log2(abs(a)) > MAX_INT_BITS:
                raise ToolError("result too large")
            result = _BINARY[type(op)](a, b)
            if isinstance(result, complex):
                raise ToolError("the result is not a real number")
            if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
                raise ToolError("result too large")
            return result
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in _FUNCTIONS:
            return _FUNCTIONS[name](*(_evaluate(a) for a in args))
    raise ToolError(f"unsupported element {ast.unparse(node)!r}; only numbers, operators, "
                    f"{', '.join(_FUNCTIONS)} and {', '.join(_CONSTANTS)} are allowed")


def format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else format(value, ".12g")


# --------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    """One line for the system prompt."""
    parameters: dict[str, type]
    """Argument name -> Python type (str or int) as it must appear in the JSON."""
    run: Callable[..., Awaitable[str]]
    """Called with the checked arguments; returns the result text, raises ToolError for a
    bad call. Anything else it raises is a bug in the tool and fails the episode."""
    optional: tuple[str, ...] = ()


def calculator_tool() -> Tool:
    async def run(expression: str) -> str:
        return format_number(calculate(expression))

    return Tool("calculator", "evaluates an arithmetic expression, e.g. \"(3 + 4) * 2 ** 10 / 7\" "
                "(+ - * / // % **, sqrt, log, exp, sin, cos, tan, abs, round, min, max, floor, ceil, pi, e)",
                {"expression": str}, run)


def python_tool(limits: SandboxLimits = SandboxLimits()) -> Tool:
    async def run(code: str) -> str:
        return (await run_python(code, limits)).render()

    return Tool("python", f"runs a Python 3 program (standard library only) and returns what it prints; "
                f"no network, files only in its own folder, {limits.timeout_s:g} s limit", {"code": str}, run)


def search_tool(index: BM25Index, k: int = 3) -> Tool:
    async def run(query: str, k: int = k) -> str:
        if not 1 <= k <= 10:
            raise ToolError("k must be between 1 and 10")
        return index.render(query, k)

    return Tool("search", "searches a document collection and returns the best matching passages",
                {"query": str, "k": int}, run, optional=("k",))


def default_tools(docs_path: str | Path = DOCS_PATH, limits: SandboxLimits = SandboxLimits()) -> dict[str, Tool]:
    tools = [calculator_tool(), python_tool(limits), search_tool(BM25Index.from_file(docs_path))]
    return {tool.name: tool for tool in tools}


def system_prompt(tools: dict[str, Tool]) -> str:
    lines = [f"- {t.name}({', '.join(f'{p}: {ty.__name__}' for p, ty in t.parameters.items())}): {t.description}"
             for t in tools.values()]
    return ("You can call tools. To call one, write exactly\n"
            '<tool_call>{"name": "<tool>", "arguments": {<arguments as JSON>}}</tool_call>\n'
            "and end your turn; the result comes back in the next message. When you know the answer, "
            "write <answer>your final answer</answer>.\nTools:\n" + "\n".join(lines))


# --------------------------------------------------------------------------- parsing

TAG_RE = re.compile(r"<(tool_call|answer)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class Answer:
    text: str


def parse_action(text: str) -> ToolCall | Answer | str:
    """The first complete <tool_call> or <answer> in the text, or an error message."""
    match = TAG_RE.search(text)
    if match is None:
        for tag in ("tool_call", "answer"):
            if f"<{tag}>" in text:
                return f"Error: <{tag}> is not closed with </{tag}>."
        return "Error: no tool call and no answer. Write <tool_call>{...}</tool_call> or <answer>...</answer>."
    kind, body = match.groups()
    if kind == "answer":
        return Answer(body.strip())
    try:
        call = json.loads(body)
    except json.JSONDecodeError as err:
        return f"Error: the tool call is not valid JSON ({err.msg} at character {err.pos})."
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return 'Error: a tool call must be a JSON object {"name": ..., "arguments": {...}}.'
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        return "Error: \"arguments\" must be a JSON object."
    return ToolCall(call["name"], arguments)


def check_arguments(tool: Tool, arguments: dict) -> str | None:
    """An error message for arguments that do not fit the tool, or None."""
    signature = ", ".join(f"{p}: {t.__name__}" for p, t in tool.parameters.items())
    unknown = sorted(set(arguments) - set(tool.parameters))
    missing = [p for p in tool.parameters if p not in arguments and p not in tool.optional]
    wrong = [p for p, t in tool.parameters.items()
             if p in arguments and (type(arguments[p]) is not t)]  # bool is not int here
    if unknown or missing or wrong:
        problems = [f"unknown {unknown}" if unknown else "", f"missing {missing}" if missing else "",
                    f"wrong type for {wrong}" if wrong else ""]
        return f"Error: bad arguments for {tool.name} ({'; '.join(p for p in problems if p)}); expected ({signature})."
    return None


# --------------------------------------------------------------------------- grading


def normalize_text(text: str) -> str:
    text = re.sub(r"[^\w\s.]|(?<!\d)\.|\.(?!\d)", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def answers_match(given: str, expected: str) -> bool:
    """Numbers by value ("1,893 metres" matches "1893"; the last number given counts),
    anything else by normalised text (case, punctuation, articles, spacing)."""
    expected_number = parse_number(expected) if NUMBER_RE.fullmatch(expected.strip()) else None
    if expected_number is not None:
        numbers = NUMBER_RE.findall(given)
        return bool(numbers) and parse_number(numbers[-1]) == expected_number
    return normalize_text(given) == normalize_text(expected)


# --------------------------------------------------------------------------- env


@dataclass(frozen=True)
class ToolTask:
    question: str
    answer: str


def load_tasks(path: str | Path = TASKS_PATH) -> list[ToolTask]:
    rows = read_jsonl(path, ("question", "answer"))
    return [ToolTask(row["question"].strip(), row["answer"].strip()) for row in rows]


class ToolUseEnv:
    def __init__(self, task: ToolTask, tokenizer, tools: dict[str, Tool], max_turns: int = 6,
                 max_tool_output_chars: int = 2000, format_bonus: float = FORMAT_BONUS):
        self.task, self.tokenizer, self.tools = task, tokenizer, tools
        self.max_turns, self.max_tool_output_chars, self.format_bonus = max_turns, max_tool_output_chars, format_bonus
        self.turns = self.tool_calls = self.errors = 0
        # The chat template's own renderer: the turns appended later (next_turn_tokens) are
        # the template's too, so a tokenizer without one is refused here.
        self.renderer = ChatTemplateRenderer(tokenizer)

    async def initial_observation(self):
        messages = [{"role": "system", "content": system_prompt(self.tools)},
                    {"role": "user", "content": self.task.question}]
        return self.renderer.build_generation_prompt(messages), [self.tokenizer.eos_token_id]

    def metrics(self, correct: float, answered: float) -> dict[str, float]:
        return {"correct": correct, "answered": answered, "format": float(answered and not self.errors),
                "tool_calls": float(self.tool_calls), "tool_errors": float(self.errors)}

    async def step(self, action: list[int]) -> StepResult:
        self.turns += 1
        parsed = parse_action(self.tokenizer.decode(action, skip_special_tokens=True))
        if isinstance(parsed, Answer):
            correct = float(answers_match(parsed.text, self.task.answer))
            metrics = self.metrics(correct, 1.0)
            return StepResult(reward=correct + self.format_bonus * metrics["format"], episode_done=True, metrics=metrics)
        if self.turns >= self.max_turns:
            return StepResult(reward=0.0, episode_done=True, metrics=self.metrics(0.0, 0.0))
        if isinstance(parsed, ToolCall):
            result = await self.call(parsed)
        else:  # the parse error is the result the model sees
            result, self.errors = parsed, self.errors + 1
        if len(result) > self.max_tool_output_chars:
            result = result[: self.max_tool_output_chars] + "\n[truncated]"
        observation = next_turn_tokens(self.tokenizer, [{"role": "tool", "content": result}], action)
        return StepResult(reward=0.0, episode_done=False, next_observation=ModelInput.from_ints(observation),
                          next_stop_condition=[self.tokenizer.eos_token_id], metrics=self.metrics(0.0, 0.0))

    async def call(self, call: ToolCall) -> str:
        self.tool_calls += 1
        tool = self.tools.get(call.name)
        error = (f"Error: unknown tool {call.name!r}; the tools are {', '.join(self.tools)}."
                 if tool is None else check_arguments(tool, call.arguments))
        if error is None:
            try:
                return await tool.run(**call.arguments)
            except ToolError as err:
                error = f"Error: {err}"
        self.errors += 1
        return error


@dataclass
class ToolUseGroupBuilder:
    task: ToolTask
    tokenizer: object
    tools: dict[str, Tool]
    group_size: int
    max_turns: int = 6
    format_bonus: float = FORMAT_BONUS

    async def make_envs(self):
        return [ToolUseEnv(self.task, self.tokenizer, self.tools, self.max_turns, format_bonus=self.format_bonus)
                for _ in range(self.group_size)]


class ToolUseDataset:
    """groups_per_batch tasks per batch, each rolled out group_size times. tools=None uses
    default_tools() (calculator, python, search over docs_path); the tools are shared."""

    def __init__(self, tokenizer, path: str | Path = TASKS_PATH, groups_per_batch: int = 4, group_size: int = 4,
                 max_turns: int = 6, tools: dict[str, Tool] | None = None, docs_path: str | Path = DOCS_PATH,
                 sandbox_limits: SandboxLimits = SandboxLimits(), seed: int | None = 0,
                 format_bonus: float = FORMAT_BONUS):
        self.tokenizer, self.groups_per_batch, self.group_size = tokenizer, groups_per_batch, group_size
        self.max_turns, self.format_bonus = max_turns, format_bonus
        self.tools = tools if tools is not None else default_tools(docs_path, sandbox_limits)
        self.tasks = load_tasks(path)
        if seed is not None:
            random.Random(seed).shuffle(self.tasks)
        if len(self.tasks) < groups_per_batch:
            raise ValueError(f"{path} has {len(self.tasks)} tasks, fewer than groups_per_batch={groups_per_batch}")

    def __len__(self) -> int:
        return len(self.tasks) // self.groups_per_batch

    def get_batch(self, index: int) -> list[ToolUseGroupBuilder]:
        start = (index % len(self)) * self.groups_per_batch
        return [ToolUseGroupBuilder(t, self.tokenizer, self.tools, self.group_size, self.max_turns, self.format_bonus)
                for t in self.tasks[start : start + self.groups_per_batch]]
