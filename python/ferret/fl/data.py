"""Instruction data for federated runs: the example type, named readers, the held-out split and
tokenisation.

Named readers: Dolly-15K (a jsonl path), Natural Instructions (a directory of task json files, one
client per task), and :func:`synthetic_tasks`, the project's own deterministic instruction data
(several task families, so a split over clients is non-IID), which needs no download. Files in
other shapes are read by :mod:`ferret.fl.sources`, spread over clients by
:mod:`ferret.fl.partitions` and formatted by :mod:`ferret.fl.templates`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A dataset or split that cannot be used as given."""


@dataclass(frozen=True)
class Example:
    """One instruction and its answer. ``category`` labels it for stratified hold-out and
    partitions (a task, a user, a hospital); ``context`` is an optional input shown with the
    instruction; ``history`` holds the (role, content) turns of a conversation before its last
    user message (roles ``system``, ``user``, ``assistant``)."""

    instruction: str
    response: str
    category: str
    context: str = ""
    history: tuple[tuple[str, str], ...] = ()


def load_dolly(path: str | Path) -> list[Example]:
    """Dolly-15K records (``instruction``, ``context``, ``response``, ``category``) from a jsonl file.

    Raises :class:`DataError` naming the file (and the line of the first malformed record) when it
    is missing, unreadable, not UTF-8, malformed or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no Dolly file at {path}")
    examples = []
    for line_no, raw in enumerate(read_bytes(path).splitlines(), start=1):
        line = decode_utf8(raw, f"{path}:{line_no}")
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            examples.append(Example(str(rec["instruction"]), str(rec["response"]), str(rec["category"]),
                                    str(rec.get("context") or "")))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{line_no}: not a Dolly record ({type(err).__name__}: {err})") from None
    if not examples:
        raise DataError(f"{path} holds no records")
    return examples


def load_natural_instructions(directory: str | Path, max_per_task: int | None = None) -> dict[str, list[Example]]:
    """Natural Instructions tasks from ``directory/*.json``: task name -> examples (one client each).

    Each example's instruction is the task's definition, its input the instance input and its
    response the first reference output. Raises :class:`DataError` naming the task file that is
    unreadable (a directory, say), not UTF-8, malformed or empty.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DataError(f"no task json files in {directory}")
    tasks = {}
    for file in files:
        text = decode_utf8(read_bytes(file), str(file))
        try:
            task = json.loads(text)
            definition = task["Definition"][0] if isinstance(task["Definition"], list) else task["Definition"]
            instances = task["Instances"][:max_per_task] if max_per_task else task["Instances"]
            tasks[file.stem] = [Example(str(definition), str(inst["output"][0]), file.stem, str(inst["input"]))
                                for inst in instances]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
            raise DataError(f"{file}: not a Natural Instructions task ({type(err).__name__}: {err})") from None
        if not tasks[file.stem]:
            raise DataError(f"{file}: the task has no instances")
    return tasks


def read_bytes(path: Path) -> bytes:
    """The bytes of the file ``path``; raises :class:`DataError` naming it when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def decode_utf8(data: bytes, where: str, error: type[ValueError] = DataError) -> str:
    """``data`` decoded as UTF-8; raises ``error`` (a :class:`DataError` by default) saying
    ``where`` the first byte that is not UTF-8 lies."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None


_WORDS = ["cat", "dog", "ball", "tree", "sun", "fish", "bird", "cake", "boat", "frog", "star", "hat",
          "moon", "bear", "duck", "kite", "lily", "tom", "ben", "sue", "box", "cup", "car", "toy"]
_COLORS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "night": "black",
           "apple": "red", "orange": "orange", "cloud": "white", "leaf": "green", "sea": "blue"}


def synthetic_tasks(n_per_family: int = 200, seed: int = 0) -> list[Example]:
    """The project's own instruction data: five templated task families, deterministic in ``seed``.

    Families (the examples' categories): ``repeat`` (say a word twice), ``reverse`` (spell a word
    backwards), ``count`` (the number after n), ``color`` (the color of a thing) and ``join``
    (two words with "and").
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_per_family):
        w, v = (_WORDS[i] for i in rng.choice(len(_WORDS), 2, replace=False))
        n = int(rng.integers(0, 50))
        thing = list(_COLORS)[int(rng.integers(len(_COLORS)))]
        out += [
            Example(f"Say the word {w} two times.", f"{w} {w}", "repeat"),
            Example(f"Spell {w} backwards.", w[::-1], "reverse"),
            Example(f"What number comes after {n}?", str(n + 1), "count"),
            Example(f"What color is the {thing}?", f"The {thing} is {_COLORS[thing]}.", "color"),
            Example(f"Join {w} and {v}.", f"{w} and {v}", "join"),
        ]
    return out


def holdout(examples: list[Example], n_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off ``n_eval`` examples stratified by category (largest remainder); returns (train, eval)."""
    if not 0 < n_eval < len(examples):
        raise DataError(f"cannot hold out {n_eval} of {len(examples)} examples")
    rng = np.random.default_rng(seed)
    by_cat = defaultdict(list)
    for i, ex in enumerate(examples):
        by_cat[ex.category].append(i)
    cats = sorted(by_cat)
    quota = np.array([n_eval * len(by_cat[c]) / len(examples) for c in cats])
    take = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - take), kind="stable")[: n_eval - take.sum()]:
        take[j] += 1
    chosen = set()
    for c, k in zip(cats, take):
        chosen.update(rng.choice(by_cat[c], size=min(k, len(by_cat[c])), replace=False).tolist())
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    return train, [examples[i] for i in sorted(chosen)]


@dataclass
class Encoded:
    """Tokenised examples: ``input_ids`` and ``labels`` (-100 on prompt tokens), one list each."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, rows, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Rows ``rows`` right-padded into ``input_ids``, ``attention_mask`` and ``labels`` tensors,
        built on the CPU and moved to ``device`` (default: left there) in one non-blocking copy each."""
        width = max(len(self.input_ids[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            n = len(self.input_ids[r])
            ids[j, :n] = torch.tensor(self.input_ids[r])
            labels[j, :n] = torch.tensor(self.labels[r])
            mask[j, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if device is None:
            return batch
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def encode(examples: list[Example], tokenizer, max_prompt: int = 128, max_length: int = 256, *,
           template="auto") -> Encoded:
    """Tokenise ``examples`` in the prompt format ``template`` (a name or path for
    :func:`~ferret.fl.templates.prompt_format`, or a format it returned); the loss covers the
    assistant's tokens only. Prompts are cut to ``max_prompt`` tokens (keeping the header that
    opens the answer) and examples to ``max_length``. Raises :class:`DataError` for bad lengths,
    :class:`~ferret.fl.settings.ConfigError` for a template that cannot be used."""
    from .templates import prompt_format

    if not 0 < max_prompt < max_length:
        raise DataError(f"need 0 < max_prompt < max_length, got {max_prompt} and {max_length}")
    fmt = prompt_format(tokenizer, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [fmt.encode(ex, max_prompt, max_length) for ex in examples]
    return Encoded([ids for ids, _ in rows], [labels for _, labels in rows], pad)


def batch_schedule(n_examples: int, steps: int, batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """``steps`` batches of row indices: passes over a fresh permutation, wrapping as needed."""
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += rng.permutation(n_examples).tolist()
    per = min(batch_size, n_examples)
    return [order[s * per : (s + 1) * per] for s in range(steps)] if per else []
