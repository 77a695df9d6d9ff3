"""Data files through Hugging Face `datasets`: GSM8K problems and chat conversations from
JSONL / JSON / Parquet, bad rows refused with their 1-based row number, offline, no cache left."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from envs.gsm8k import SAMPLE_PATH, load_problems
from rlpipe.data_files import load_conversations, load_rows
from rlpipe.renderers import get_renderer
from tests.scripted import EXAMPLES

GOOD = {"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5"}, {"role": "user", "content": "Now add 4."},
        {"role": "assistant", "content": "5 + 4 = 9"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sft_chat():
    """examples/sft_chat.py as a module (the examples are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_chat_module", EXAMPLES / "sft_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- GSM8K problems


def test_jsonl_json_and_parquet_load_the_same_problems(tmp_path):
    rows = sample_rows()
    # An extra column, as in the Hugging Face GSM8K files' neighbours, is ignored.
    table = pa.table({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
                      "source": ["sample"] * len(rows)})
    pq.write_table(table, tmp_path / "gsm8k.parquet")
    (tmp_path / "gsm8k.json").write_text(json.dumps(rows))  # one JSON array
    from_jsonl = load_problems(SAMPLE_PATH)
    assert len(from_jsonl) == 30
    assert load_problems(tmp_path / "gsm8k.parquet") == from_jsonl
    assert load_problems(tmp_path / "gsm8k.json") == from_jsonl
    assert from_jsonl[0].answer == 32 and from_jsonl[0].question.startswith("Mia has 14 stickers")


def test_a_glob_character_in_the_file_name_is_not_a_pattern(tmp_path):
    write_jsonl(tmp_path / "other.jsonl", [GOOD, GOOD])
    path = write_jsonl(tmp_path / "data[1]*.jsonl", [GOOD])
    assert len(load_problems(path)) == 1


@pytest.mark.parametrize("bad, row, problem", [
    ({"question": "q?"}, 3, "missing 'answer'"),
    ({"question": "q?", "answer": "it is 4"}, 3, "the answer has no final '#### <number>' line"),
    ({"question": "q?", "answer": "#### four"}, 3, "the answer has no final '#### <number>' line"),
    ({"question": 7, "answer": "#### 7"}, 3, "'question' is a int, not a string"),
    ({"question": ["q?"], "answer": "#### 7"}, 3, "'question' is a list, not a string"),
    ({"question": "  ", "answer": "#### 7"}, 3, "empty 'question'"),
])
def test_bad_problem_rows_are_refused_with_their_number(tmp_path, bad, row, problem):
    path = write_jsonl(tmp_path / "problems.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError) as info:
        load_problems(path)
    assert str(info.value) == f"{path}: row {row} (1-based): {problem}"


def test_bad_parquet_row_is_refused_with_its_number(tmp_path):
    path = tmp_path / "problems.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?", "c?"], "answer": ["#### 1", None, "#### 3"]}), path)
    with pytest.raises(ValueError, match=r"problems.parquet: row 2 \(1-based\): missing 'answer'"):
        load_problems(path)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_problems(tmp_path / "nope.parquet")
    (tmp_path / "problems.csv").write_text("question,answer\nq,#### 1\n")
    with pytest.raises(ValueError, match=r"problems.csv: unsupported file type '.csv'; use one of .jsonl, .json, .parquet"):
        load_problems(tmp_path / "problems.csv")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: the file is empty"):
        load_problems(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(ValueError, match="blank.jsonl: cannot be read as json"):
        load_problems(tmp_path / "blank.jsonl")
    (tmp_path / "text.parquet").write_text("not parquet at all")
    with pytest.raises(ValueError, match="text.parquet: cannot be read as parquet"):
        load_problems(tmp_path / "text.parquet")
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "1+1?", "a": "#### 2"}])
    with pytest.raises(ValueError, match=r"qa.jsonl: no column 'question', 'answer' \(the file has: q, a\)"):
        load_problems(tmp_path / "qa.jsonl")
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="none.parquet"):
        load_problems(tmp_path / "none.parquet")


def test_offline_and_nothing_left_in_the_cache(tmp_path):
    """In a fresh process with the Hub offline and HF_HOME in tmp_path: the file loads and
    HF_HOME stays empty (datasets reads its offline setting at import, hence the subprocess)."""
    home = tmp_path / "hf_home"
    home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home),
           "HF_DATASETS_CACHE": str(home / "datasets")}
    code = "import sys; from rlpipe.data_files import load_rows; print(len(load_rows(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, str(SAMPLE_PATH)], env=env, capture_output=True, check=False,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "30"
    assert list(home.rglob("*")) == []


# --------------------------------------------------------------------------- conversations


def test_conversations_from_jsonl_and_parquet(tmp_path):
    # extra message keys ("name") are dropped; the rest is kept as it is
    chats = [CHAT, [{"role": "user", "content": "hi", "name": "ann"}, {"role": "assistant", "content": "hello"}]]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c, "id": i} for i, c in enumerate(chats)])
    expected = [CHAT, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    assert load_conversations(path) == expected
    pq.write_table(pa.table({"messages": expected}), tmp_path / "chats.parquet")
    assert load_conversations(tmp_path / "chats.parquet") == expected


@pytest.mark.parametrize("bad, problem", [
    ({"messages": []}, "'messages' must be a non-empty list, got []"),
    ({"messages": None}, "'messages' must be a non-empty list, got None"),
    ({"messages": "hello"}, "'messages' must be a non-empty list, got 'hello'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     "message 2 has unknown role 'bot' (known: system, user, assistant, tool)"),
    ({"messages": [{"content": "hi"}]}, "message 1 has unknown role None (known: system, user, assistant, tool)"),
    ({"messages": [{"role": "user", "content": 5}]}, "message 1 (user) has non-string content 5"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "message 1 (user) has non-string content [{'type': 'text', 'text': 'hi'}]"),
    ({"messages": [{"role": "user"}]}, "message 1 (user) has non-string content None"),
    ({"messages": ["hi"]}, "message 1 is a str, not an object"),
])
def test_bad_conversation_rows_are_refused_with_their_number(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}, bad])
    with pytest.raises(ValueError) as info:
        load_conversations(path)
    assert str(info.value) == f"{path}: row 2 (1-based): {problem}"


def test_rows_keep_their_order_and_only_the_asked_columns(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"a": i, "b": str(i)} for i in range(50)])
    assert load_rows(path, ("b",)) == [{"b": str(i)} for i in range(50)]


# --------------------------------------------------------------------------- sft_chat --data


def test_sft_chat_file_datums_weigh_the_assistant_tokens(tmp_path, tiny_model_path, sft_chat):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    renderer = get_renderer(tokenizer)
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    chats, datums = sft_chat.file_datums(renderer, str(path))
    assert chats == [CHAT, CHAT[1:3]] and len(datums) == 2
    for chat, datum in zip(chats, datums):
        targets = datum.loss_fn_inputs["target_tokens"].to_numpy().tolist()
        weights = datum.loss_fn_inputs["weights"].to_numpy().tolist()
        assert set(weights) == {0.0, 1.0}
        # the weighted targets, split into runs, are exactly each assistant turn and its end token
        runs, run = [], []
        for token, weight in zip(targets, weights):
            if weight:
                run.append(token)
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
        assert [tokenizer.decode(r) for r in runs] == [m["content"] + tokenizer.eos_token
                                                       for m in chat if m["role"] == "assistant"]


def test_sft_chat_refuses_a_conversation_without_an_assistant_turn(tmp_path, tiny_model_path, sft_chat):
    renderer = get_renderer(AutoTokenizer.from_pretrained(tiny_model_path))
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    with pytest.raises(ValueError, match=r"chats.jsonl: row 2 \(1-based\): .*needs at least one assistant message"):
        sft_chat.file_datums(renderer, str(path))
