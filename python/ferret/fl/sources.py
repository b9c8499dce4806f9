"""Data as users keep it, read through Hugging Face ``datasets``: a JSON, JSON Lines, CSV or
Parquet file, or a directory written by ``save_to_disk``, turned into :class:`Example` records.

Two shapes of record:

- **instruction records**: columns for ``instruction`` and ``response`` (required), ``context``
  and ``category`` (optional). Their default names are Dolly-15K's; ``columns`` maps other names,
  e.g. ``{"instruction": "prompt", "response": "completion", "category": "task"}``;
- **conversations**: a ``messages`` column (or the column ``columns["messages"]`` names) holding
  a list of ``{"role", "content"}`` turns that ends with the assistant's answer to a user message;
  ``category`` may be mapped as above.

Every record is checked before it is used; the first bad one raises :class:`DataError` naming the
file and the record (its 0-based row). Nothing is cached on disk.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import tempfile
import warnings
from pathlib import Path

from .data import DataError, Example, decode_utf8, read_bytes

FIELDS = ("instruction", "response", "context", "category", "messages")
REQUIRED = ("instruction", "response")
ROLES = ("system", "user", "assistant")
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "state.json",
                                                                      "dataset_dict.json"))


def load_examples(path: str | Path, columns: dict | None = None) -> list[Example]:
    """The examples of the file or saved dataset at ``path``, with ``columns`` mapping ferret's
    fields (:data:`FIELDS`) to the data's column names (see the module docstring).

    Raises :class:`DataError` naming the file for a missing or unreadable file, an unknown format,
    an unknown field or missing column in ``columns``, no records, and naming the record for the
    first one whose values are missing or of the wrong type.
    """
    path = Path(path)
    columns = dict(columns or {})
    check_columns(columns)
    table = _read(path)
    names = list(table.column_names)
    mapping = _mapping(path, names, columns)
    if len(table) == 0:
        raise DataError(f"{path} holds no records")
    read = _conversation if "messages" in mapping else _instruction
    return [read(path, i, row, mapping) for i, row in enumerate(table.select_columns(list(mapping.values())))]


def check_columns(columns: dict) -> None:
    """Raise :class:`DataError` unless ``columns`` maps fields of :data:`FIELDS` to column names."""
    for field, column in columns.items():
        if field not in FIELDS:
            raise DataError(f"columns: unknown field {field!r} (fields: {', '.join(FIELDS)})")
        if not isinstance(column, str) or not column:
            raise DataError(f"columns: {field} must name a column, got {column!r}")


def _read(path: Path):
    """The ``datasets.Dataset`` at ``path``, kept in memory; :class:`DataError` when it cannot be read."""
    import datasets

    if is_saved_dataset(path):
        try:
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        except Exception as err:  # datasets raises many kinds; all mean the same to the user
            raise DataError(f"{path}: not a readable saved dataset ({type(err).__name__}: {err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise DataError(f"{path} holds the splits {', '.join(loaded)}: save the one to train on alone, "
                                f"or name it 'train'")
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded
    if not path.is_file():
        raise DataError(f"no data file or saved dataset at {path}")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}: use a .json, .jsonl, .csv or "
                        f".parquet file, or a directory written by save_to_disk")
    if builder in ("json", "csv"):  # pyarrow reads any bytes, and fails on them only row by row
        text = decode_utf8(read_bytes(path), str(path))
        if builder == "csv":
            _check_header(path, text)
    try:
        with quiet_datasets(), tempfile.TemporaryDirectory(prefix="ferret-datasets-") as cache:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True)
    except Exception as err:  # pyarrow and datasets raise many kinds; all mean a file we cannot read
        cause = err.__cause__ or err.__context__ or err
        raise DataError(f"{path}: cannot be read as {path.suffix[1:].upper()} ({type(cause).__name__}: {cause})") from None


def _check_header(path: Path, text: str) -> None:
    """Raise :class:`DataError` for a CSV header that names a column twice (a reader would keep
    one of them, silently)."""
    header = next(csv.reader(io.StringIO(text)), [])
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: the header names column {name!r} twice: rename one")
        seen.add(name)


@contextlib.contextmanager
def quiet_datasets():
    """``datasets`` without progress bars, warnings or its own error log (which repeats what we raise)."""
    import datasets

    log = logging.getLogger("datasets")
    level, log.level = log.level, logging.CRITICAL
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.level = level
        if bars:
            datasets.enable_progress_bars()


def _mapping(path: Path, names: list[str], columns: dict) -> dict:
    """field -> column for the fields the data has; :class:`DataError` for a missing column."""
    for field, column in columns.items():
        if column not in names:
            raise DataError(f"{path}: no column {column!r} for {field} (columns: {', '.join(names)})")
    conversational = "messages" in columns or ("messages" in names and not set(columns) & {"instruction", "response"})
    unused = sorted(set(columns) & {"instruction", "response", "context"}) if conversational else []
    if unused:
        raise DataError(f"{path}: the records are conversations (column {columns.get('messages', 'messages')!r}); "
                        f"columns also maps {' and '.join(unused)}, which conversations do not use: drop "
                        f"{'it' if len(unused) == 1 else 'them'}")
    wanted = ("messages", "category") if conversational else ("instruction", "response", "context", "category")
    mapping = {f: columns.get(f, f) for f in wanted if columns.get(f, f) in names}
    for field in ("messages",) if conversational else REQUIRED:
        if field not in mapping:
            raise DataError(f"{path}: no column {field!r} (columns: {', '.join(names)}); map one with "
                            f"columns = {{{field} = \"...\"}}")
    return mapping


def _text(path: Path, i: int, row: dict, mapping: dict, field: str, required: bool = True) -> str:
    value = row.get(mapping.get(field, ""))
    if value is None and not required:
        return ""
    if field == "category" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        what = "missing" if value is None else f"{type(value).__name__} {_short(value)}"
        raise DataError(f"{path}: record {i}: {field} (column {mapping[field]!r}) must be text, got {what}")
    return value


def _instruction(path: Path, i: int, row: dict, mapping: dict) -> Example:
    return Example(_text(path, i, row, mapping, "instruction"), _text(path, i, row, mapping, "response"),
                   _text(path, i, row, mapping, "category", required=False),
                   _text(path, i, row, mapping, "context", required=False))


def _conversation(path: Path, i: int, row: dict, mapping: dict) -> Example:
    turns = row[mapping["messages"]]
    where = f"{path}: record {i}: {mapping['messages']}"
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where} must be a non-empty list of {{role, content}} turns, got {_short(turns)}")
    pairs = []
    for j, turn in enumerate(turns):
        if not (isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(turn.get("content"), str)):
            raise DataError(f"{where}[{j}] must be {{role: one of {', '.join(ROLES)}, content: text}}, got {_short(turn)}")
        pairs.append((turn["role"], turn["content"]))
    if len(pairs) < 2 or pairs[-1][0] != "assistant" or pairs[-2][0] != "user":
        raise DataError(f"{where} must end with a user message and the assistant's answer")
    return Example(pairs[-2][1], pairs[-1][1], _text(path, i, row, mapping, "category", required=False),
                   history=tuple(pairs[:-2]))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
