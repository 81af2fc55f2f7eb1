"""sclora.data: every file format and row format from small files the tests write, and every bad-data case
refused with the file, row (line) and field named, before anything is computed."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_tokenizer

from sclora.chat import example_segments, render_example
from sclora.data import DataError, DataSource, load_examples, parse_source, resolve_data
from sclora.statistics_cache import statistics_batches
from sclora.train import IGNORE_INDEX, tokenize_examples

QA = [{"question": f"what is {w}", "answer": f"{w} is one", "id": i} for i, w in enumerate(("paris", "rome", "berlin"))]
CHAT = [{"messages": [{"role": "system", "content": "we help"}, {"role": "user", "content": "what is paris"},
                      {"role": "assistant", "content": "a city"}, {"role": "user", "content": "and rome"},
                      {"role": "assistant", "content": "a city too"}]}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_file_format_gives_the_same_examples(tmp_path):
    import datasets
    import pandas as pd

    rows = [{"prompt": r["question"], "response": r["answer"]} for r in QA]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved_dict"))
    expected = load_examples(tmp_path / "a.jsonl", seed=3)
    assert sorted(e["prompt"] for e in expected) == sorted(r["prompt"] for r in rows)
    for name in ("a.json", "a.csv", "a.parquet", "saved", "saved_dict"):
        assert load_examples(tmp_path / name, seed=3) == expected, name


def test_field_mapping_n_offset_and_the_seeded_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    source = {"path": str(path), "prompt": "question", "response": "answer"}
    every = load_examples(source, seed=0)
    assert {e["prompt"] for e in every} == {r["question"] for r in QA} and all(set(e) == {"prompt", "response"}
                                                                               for e in every)
    assert load_examples({**source, "n": 2, "offset": 1}, seed=0) == every[1:3]
    assert load_examples({**source, "shuffle": False}, seed=0)[0]["prompt"] == QA[0]["question"]
    assert load_examples(source, seed=0) == every  # deterministic under the seed
    with pytest.raises(DataError, match="3 rows, but offset 2 \\+ n 2"):
        load_examples({**source, "n": 2, "offset": 2})
    # the same source written inline (--data '{...}') or as PATH:N:OFFSET
    assert parse_source(f"{{path: {path}, prompt: question, response: answer, n: 2}}") == DataSource(
        str(path), n=2, prompt="question", response="answer")
    assert parse_source(f"{path}:5:7") == DataSource(str(path), 5, 7)
    with pytest.raises(DataError, match="unknown key\\(s\\) \\['promt'\\]"):
        parse_source({"path": str(path), "promt": "question"})


def test_chat_rows_train_on_assistant_turns_only(tmp_path):
    tok = tiny_tokenizer()
    [example] = load_examples(write_jsonl(tmp_path / "chat.jsonl", CHAT))
    segments = example_segments(tok, example)
    assert "".join(t for t, _ in segments) == tok.apply_chat_template(example["messages"], tokenize=False)
    assert [t for t, trained in segments if trained] == [" a city\n", " a city too\n"]  # after "assistant :"
    [item] = tokenize_examples(tok, [example], max_length=64)
    trained = [t for t, label in zip(item["input_ids"], item["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(trained) == tok.decode(tok("a city\n a city too\n", add_special_tokens=False)["input_ids"])
    assert trained and item["labels"][: len(tok("system : we help", add_special_tokens=False)["input_ids"])] == \
        [IGNORE_INDEX] * len(tok("system : we help", add_special_tokens=False)["input_ids"])


def test_plain_text_rows_train_on_every_token_and_statistics_see_the_rendered_text(tmp_path):
    tok = tiny_tokenizer()
    examples = load_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": "the capital of france is paris"}]))
    [item] = tokenize_examples(tok, examples, max_length=64)
    assert item["labels"] == item["input_ids"] and item["input_ids"][-1] == tok.eos_token_id
    assert render_example(tok, examples[0]) == "the capital of france is paris"
    qa = {"prompt": "what is paris", "response": "a city"}
    assert render_example(tok, qa) == tok.apply_chat_template([{"role": "user", "content": "what is paris"}],
                                                              tokenize=False, add_generation_prompt=True) + "a city"


def test_long_rows_are_truncated_and_counted(tmp_path):
    tok = tiny_tokenizer()
    examples = [{"text": "one two three " * 10}, {"text": "one two"}, {"prompt": "what " * 40, "response": "paris"}]
    with pytest.warns(UserWarning) as caught:
        items = tokenize_examples(tok, examples, max_length=16)
    assert (items.truncated, items.dropped, len(items)) == (1, 1, 2)
    assert any("Cut 1 of 3" in str(w.message) for w in caught) and any("Dropped 1 of 3" in str(w.message)
                                                                       for w in caught)
    batches = statistics_batches(tok, examples, seq_len=8, batch_size=2)
    assert (batches.examples, batches.truncated) == (3, 2)
    assert all(b["input_ids"].shape[1] <= 8 for b in batches)
    from conftest import tiny_llama

    from sclora.statistics_cache import cached_statistics

    with pytest.warns(UserWarning, match="plus statistics: 2 of 3 examples are longer than seq_len=8"):
        cached_statistics(tmp_path / "stats", "plus", tiny_llama(), tok, examples, seq_len=8, batch_size=2,
                          target_modules=["q_proj"], normalize="none", side="output", show_progress=False)


BAD = [
    ("missing.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', "line 2: field 'response' is missing"),
    ("empty_field.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": " ", "response": "d"}\n',
     "line 2: field 'prompt' is empty"),
    ("type.jsonl", b'{"prompt": "a", "response": 42}\n', "line 1: field 'response' must be a string, got int"),
    ("json.jsonl", b'{"prompt": "a", "response": "b"}\n\n{"prompt": "a" "response": "b"}\n', "line 3: invalid JSON"),
    ("utf8.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n',
     "line 2: bytes that are not UTF-8"),
    ("empty.jsonl", b"\n\n", "the file is empty"),
    ("fields.jsonl", b'{"question": "a", "answer": "b"}\n', "none of 'prompt'"),
    ("role.jsonl", b'{"messages": [{"role": "bot", "content": "x"}]}\n', "line 1, message 0: field 'role' must be"),
    ("messages.jsonl", b'{"messages": "hello"}\n', "field 'messages' must be a non-empty list"),
    ("row.jsonl", b'["a", "b"]\n', "a row must be an object"),
    ("cells.csv", b"prompt,response\na,b\nc,\n", "line 3: field 'response' is empty"),
    ("kind.txt", b"hello\n", "unknown file type '.txt'"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_a_clear_error_naming_file_row_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=str(path).replace(".", "\\.")) as err:
        load_examples(path)
    assert message in str(err.value)


def test_too_few_rows_a_missing_file_and_unknown_names(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match="1 rows, but offset 0 \\+ n 5"):
        load_examples(f"{path}:5")
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no installed package knows this name"):
        resolve_data("no-such-dataset-name")
    assert resolve_data(str(path)) == [{"prompt": "a", "response": "b"}]


def test_token_ids_ignore_and_keep_the_padding_a_previous_call_left_on_the_tokenizer():
    from sclora.statistics_cache import token_ids

    tok = tiny_tokenizer()
    texts = ["what is paris", "one two three four five six seven eight nine ten"]
    alone = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    tok(texts, padding=True, truncation=True, max_length=4)  # transformers leaves this set on the backend
    padding, truncation = tok.backend_tokenizer.padding, tok.backend_tokenizer.truncation
    assert padding is not None and truncation is not None
    assert token_ids(tok, texts) == alone
    assert (tok.backend_tokenizer.padding, tok.backend_tokenizer.truncation) == (padding, truncation)


@pytest.mark.parametrize("side", ["right", "left"])
def test_statistics_batches_equal_the_straightforward_path(side):
    """Rendering, tokenizing and padding as statistics_batches does (template parts reused, Rust batch encoder,
    padding built directly) gives the tensors of Jinja + tokenizer(..., padding, truncation)."""
    tok = tiny_tokenizer()
    tok.padding_side = side
    examples = [{"prompt": "what is " + "one two " * (i % 9), "response": "paris ." * (i % 4)} for i in range(23)]
    batches = statistics_batches(tok, examples, seq_len=12, batch_size=5)
    for k, i in enumerate(range(0, len(examples), 5)):
        texts = [tok.apply_chat_template([{"role": "user", "content": e["prompt"]}], tokenize=False,
                                         add_generation_prompt=True) + e["response"] for e in examples[i:i + 5]]
        enc = tok(texts, max_length=12, truncation=True, padding=True, add_special_tokens=False, return_tensors="pt")
        assert batches[k]["input_ids"].tolist() == enc["input_ids"].tolist()
        assert batches[k]["attention_mask"].tolist() == enc["attention_mask"].tolist()
    assert len(batches) == 5 and batches.truncated == sum(len(tok(t, add_special_tokens=False)["input_ids"]) > 12
                                                           for t in (render_example(tok, e) for e in examples))
