"""GSM8K-format grade-school math word problems, answered in one assistant turn.

Data: a .jsonl, .json (JSON Lines or one array) or .parquet file of rows {"question": ...,
"answer": ...}, where the answer is a worked solution ending in "#### N" (the GSM8K format;
"<<48/2=24>>" calculator annotations may appear and are ignored), read through Hugging Face
`datasets` (rlpipe.data_files: offline, nothing left in the cache). Other columns are ignored,
so the files of the Hugging Face GSM8K dataset load as they are. A bad row is refused with its
1-based row number. `SAMPLE_PATH` is a small file of 30 problems written for rlpipe's tests;
for training, pass the path of your own copy of GSM8K.

The model's answer is read from "#### N" or "\\boxed{N}" (the last one wins), which also
earns the format term; without either, the last number in the text is still graded for
correctness but earns no format term. Numbers may have thousands separators, decimals, a
minus sign and a dollar sign: "$1,234.50", "-7", "\\$12".
Reward = 1 for a correct answer + FORMAT_BONUS (0.1) for the "#### N" / "\\boxed{N}" form.
Each problem is a rlpipe.env.ProblemEnv, its question followed by INSTRUCTION on a new line.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from rlpipe.data_files import load_rows, row_error
from rlpipe.env import ProblemGroupBuilder, reference_datum
from rlpipe.renderers import get_renderer

SAMPLE_PATH = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
FORMAT_BONUS = 0.1
INSTRUCTION = "Solve the problem step by step, then give the final answer on its own line as '#### <number>'."

# A number: optional minus and dollar sign in either order, digits with proper thousands
# separators (so "3,4" is two numbers), optional decimals; or a bare ".5".
NUMBER = r"[-\u2212]?\$?[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-\u2212]?\$?\.\d+"
NUMBER_RE = re.compile(NUMBER)
HASHES_RE = re.compile(r"####\s*(" + NUMBER + ")")
BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")


def parse_number(text: str) -> Decimal | None:
    """"$1,234.50" -> Decimal("1234.50"); None if text holds no number. Decimal compares by
    value, so "18", "18.0" and "18.00" are equal."""
    match = NUMBER_RE.search(text.replace("\\$", "$").replace("\\!", "").replace("{,}", ","))
    if match is None:
        return None
    raw = match.group(0)
    negative = raw.count("-") + raw.count("\u2212") == 1
    digits = re.sub(r"[^\d.]", "", raw)
    try:
        value = Decimal(digits)
    except InvalidOperation:  # cannot happen for a NUMBER match; kept as a clear guard
        return None
    return -value if negative else value


def extract_answer(text: str) -> tuple[Decimal | None, bool]:
    """(the model's final answer, whether it was given in the '#### N' / '\\boxed{N}' form)."""
    marked = [(m.start(), parse_number(m.group(1))) for m in HASHES_RE.finditer(text)]
    marked += [(m.start(), parse_number(m.group(1))) for m in BOXED_RE.finditer(text)]
    marked = [(pos, value) for pos, value in marked if value is not None]
    if marked:
        return max(marked, key=lambda pair: pair[0])[1], True
    numbers = NUMBER_RE.findall(text)
    return (parse_number(numbers[-1]) if numbers else None), False


def grade(text: str, answer: Decimal) -> tuple[float, dict[str, float]]:
    """(reward, metrics) for a decoded completion."""
    given, formatted = extract_answer(text)
    correct = float(given is not None and given == answer)
    return correct + FORMAT_BONUS * float(formatted), {"correct": correct, "format": float(formatted),
                                                       "answered": float(given is not None)}


@dataclass(frozen=True)
class Problem:
    """A word problem; the rlpipe.env.Problem a ProblemEnv asks and grades."""

    question: str
    solution: str
    """The worked solution as in the file, "#### N" line included."""
    answer: Decimal

    def check_answer(self, response: str) -> bool:
        given = extract_answer(response)[0]
        return given is not None and given == self.answer

    def check_format(self, response: str) -> bool:
        return extract_answer(response)[1]

    def metrics(self, response: str) -> dict[str, float]:
        return {"answered": float(extract_answer(response)[0] is not None)}

    def reference_answer(self) -> str:
        return self.solution.strip()


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Objects of a JSONL file (blank lines skipped), each checked for the required string
    fields; errors name the file and line. (GSM8K problems load through rlpipe.data_files;
    this stays for envs/search.py and envs/tool_use.py.)"""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{path}:{lineno}: missing or empty string field {key!r}")
            rows.append({**row, "_line": lineno})
    if not rows:
        raise ValueError(f"{path}: no data")
    return rows


def load_problems(path: str | Path = SAMPLE_PATH) -> list[Problem]:
    """The problems of a GSM8K-format .jsonl / .json / .parquet file, in file order."""
    problems = []
    for number, row in enumerate(load_rows(path, ("question", "answer")), 1):
        for key in ("question", "answer"):
            if row[key] is None:
                raise row_error(path, number, f"missing {key!r}")
            if not isinstance(row[key], str):
                raise row_error(path, number, f"{key!r} is a {type(row[key]).__name__}, not a string")
            if not row[key].strip():
                raise row_error(path, number, f"empty {key!r}")
        final = row["answer"].rsplit("####", 1)
        answer = parse_number(final[1]) if len(final) == 2 else None
        if answer is None:
            raise row_error(path, number, "the answer has no final '#### <number>' line")
        problems.append(Problem(row["question"].strip(), row["answer"], answer))
    return problems


class GSM8KDataset:
    """groups_per_batch problems per batch, each rolled out group_size times; the problems
    are shuffled once with `seed` (None keeps the file order)."""

    def __init__(self, tokenizer, path: str | Path, groups_per_batch: int = 8, group_size: int = 8,
                 seed: int | None = 0, instruction: str = INSTRUCTION):
        self.renderer = get_renderer(tokenizer)
        self.groups_per_batch = groups_per_batch
        self.group_size = group_size
        self.instruction = instruction
        self.problems = load_problems(path)
        if seed is not None:
            random.Random(seed).shuffle(self.problems)
        if len(self.problems) < groups_per_batch:
            raise ValueError(f"{path} has {len(self.problems)} problems, "
                             f"fewer than groups_per_batch={groups_per_batch}")

    def __len__(self) -> int:
        return len(self.problems) // self.groups_per_batch

    def get_batch(self, index: int) -> list[ProblemGroupBuilder]:
        start = (index % len(self)) * self.groups_per_batch
        return [ProblemGroupBuilder(p, self.renderer, self.group_size, FORMAT_BONUS, self.instruction)
                for p in self.problems[start : start + self.groups_per_batch]]


def answer_datums(tokenizer, path: str | Path = SAMPLE_PATH, instruction: str = INSTRUCTION):
    """The worked solutions of a file as cross-entropy Datums after their prompts (loss on the
    solution and its end of turn only): SFT warm-up data."""
    renderer = get_renderer(tokenizer)
    return [reference_datum(renderer, p, instruction) for p in load_problems(path)]
