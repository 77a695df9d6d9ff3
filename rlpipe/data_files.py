"""Rows of local data files (JSON Lines, JSON, Parquet) through Hugging Face `datasets`, with
errors that name the file and the row.

    rows = load_rows("train.parquet", columns=("question", "answer"))   # list of dicts
    chats = load_conversations("chats.jsonl")    # rows {"messages": [{"role", "content"}, ...]}
    raise row_error(path, 7, "the answer has no final '#### <number>' line")

Rows are numbered from 1 in file order; in a JSON Lines file blank lines are skipped, so row n
is the n-th non-blank line. Reading works offline (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1)
because the "json" and "parquet" builders ship inside `datasets`, and it leaves nothing in
the user's cache: the Arrow copy `datasets` builds is written to a temporary directory, read
into memory and deleted.
"""

from __future__ import annotations

import glob
import json
import tempfile
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""File extension -> `datasets` builder. ".json" may hold JSON Lines or one array of objects."""
ROLES = ("system", "user", "assistant", "tool")
"""The roles rlpipe.renderers knows."""


def row_error(path: str | Path, row: int, problem: str) -> ValueError:
    """The error for a bad row; `row` counts from 1."""
    return ValueError(f"{path}: row {row} (1-based): {problem}")


def load_rows(path: str | Path, columns: tuple[str, ...] | None = None) -> list[dict]:
    """All rows of a .jsonl / .json / .parquet file as dicts, in file order.

    With `columns`, only those are kept and a file without one of them is refused (a row that
    lacks a key another row has gets None there: the callers check values row by row)."""
    # Imported here, not at the top: `datasets` (with pandas and pyarrow) takes about a second
    # to import, and modules such as envs/gsm8k.py are imported for their parsers alone.
    import datasets
    import pyarrow

    path = Path(path)
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    quiet = not datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per small local file would only clutter the console and role logs
    with tempfile.TemporaryDirectory(prefix="rlpipe-data-") as cache_dir:
        try:
            # data_files is a glob pattern: escape it so "[1]" in a file name is not a pattern.
            ds = datasets.load_dataset(builder, data_files=glob.escape(str(path.resolve())), split="train",
                                       cache_dir=cache_dir, keep_in_memory=True)
        # What a malformed file makes load_dataset raise: its own errors, pyarrow's parse
        # errors, ValueError ("corresponds to no data" for a blank file) and StopIteration (a
        # file it finds nothing in); re-raised as one ValueError naming the file.
        except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, StopIteration) as err:
            raise ValueError(f"{path}: cannot be read as {builder}: {_read_problem(path, err)}") from err
        finally:
            if not quiet:
                datasets.enable_progress_bars()
    if columns is not None:
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} "
                             f"(the file has: {', '.join(ds.column_names) or 'none'})")
        ds = ds.select_columns(list(columns))
    if len(ds) == 0:
        raise ValueError(f"{path}: no rows")
    return ds.to_list()


def _read_problem(path: Path, err: BaseException) -> str:
    """Why load_dataset failed. pyarrow's JSON errors count rows from 0 within a block of the
    file, so for JSON Lines the first line json cannot parse is looked up here instead."""
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as bad:
                    return f"line {lineno} is not valid JSON ({bad.msg})"
                if not isinstance(value, dict):
                    return f"line {lineno} is a JSON {type(value).__name__}, not an object"
    cause = err.__cause__ or err
    return f"{type(cause).__name__}: {cause}"


def check_message(message: object, index: int) -> str | None:
    """What is wrong with one chat message (`index` counts from 1), or None."""
    if not isinstance(message, dict):
        return f"message {index} is a {type(message).__name__}, not an object"
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        return f"message {index} has unknown role {role!r} (known: {', '.join(ROLES)})"
    if not isinstance(content, str):
        return f"message {index} ({role}) has non-string content {content!r:.60}"
    return None


def load_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """The conversations of a file of rows {"messages": [{"role": ..., "content": ...}, ...]}
    (the common chat format). Only role and content are kept; any other message keys are dropped."""
    conversations = []
    for number, row in enumerate(load_rows(path, ("messages",)), 1):
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise row_error(path, number, f"'messages' must be a non-empty list, got {messages!r:.60}")
        for index, message in enumerate(messages, 1):
            problem = check_message(message, index)
            if problem:
                raise row_error(path, number, problem)
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return conversations
