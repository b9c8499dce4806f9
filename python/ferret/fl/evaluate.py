"""Evaluation of a causal LM: eval loss over the assistant's tokens, Rouge-L of greedy generations,
and MMLU accuracy scored by the log-likelihood of the four options. Generation and MMLU prompt the
model in the same format as training (``template``: see :mod:`ferret.fl.templates`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .data import DataError, Encoded, Example, decode_utf8, read_bytes
from .runtime import DEFAULT, Runtime, model_device
from .templates import prompt_format


@torch.no_grad()
def eval_loss(model, data: Encoded, batch_size: int = 16, *, runtime: Runtime = DEFAULT) -> float:
    """Mean cross-entropy per response token over ``data``, computed on the model's device with
    forward passes under ``runtime.autocast()``; one host sync, at the end."""
    model.eval()
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)  # fp64 sums, as Python floats were
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(data), batch_size):
        batch = data.batch(list(range(start, min(start + batch_size, len(data)))), device)
        with runtime.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += loss.double()
        tokens += (labels != -100).sum()
    total, tokens = torch.stack([total, tokens.double()]).tolist()  # the one sync
    return total / max(int(tokens), 1)


@torch.no_grad()
def rouge_l(model, tokenizer, examples: list[Example], max_new_tokens: int = 128, max_prompt: int = 128,
            batch_size: int = 16, *, template="auto", runtime: Runtime = DEFAULT) -> float:
    """Mean Rouge-L F (``rouge-score``, Porter stemming) of greedy generations against the
    reference responses, from 0 to 100 (as the papers print it). Prompts are rendered in ``template``'s format (a name, a
    path or a format object), cut to ``max_prompt`` tokens and generated ``batch_size`` at a time
    (left-padded), on the model's device under ``runtime.autocast()``; generation stops at the end
    of the assistant's turn or after ``max_new_tokens``."""
    from rouge_score import rouge_scorer

    fmt = prompt_format(tokenizer, template)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    model.eval()
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [fmt.prompt_ids(ex, max_prompt) for ex in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with runtime.autocast():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=fmt.stop_ids, pad_token_id=pad)
        for ex, row in zip(chunk, out[:, width:].tolist()):
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            scores.append(scorer.score(ex.response, text)["rougeL"].fmeasure)
    return 100 * float(np.mean(scores)) if scores else float("nan")


LETTERS = "ABCD"


def load_mmlu(path: str | Path, limit: int = 0) -> list[Example]:
    """MMLU questions from a JSON array of {instruction, input, output, class} records (FLoRA's
    1,444-question file), the first ``limit`` if given. The response is the correct letter.
    Raises :class:`DataError` naming the first malformed record."""
    path = Path(path)
    try:
        records = json.loads(decode_utf8(read_bytes(path), str(path)))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not JSON: {err}") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} is not a non-empty JSON array of questions")
    questions = []
    for i, rec in enumerate(records[: limit or None]):
        try:
            answer = rec["output"].split("The answer is:")[1].strip()[0]
            if answer not in LETTERS:
                raise ValueError(f"answer {answer!r} is not one of {LETTERS}")
            questions.append(Example(rec["instruction"], answer, rec.get("class", ""), rec["input"]))
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
            raise DataError(f"{path}: record {i} is not an MMLU question ({type(err).__name__}: {err})") from None
    return questions


@torch.no_grad()
def mmlu_accuracy(model, tokenizer, questions: list[Example], *, template="auto",
                  runtime: Runtime = DEFAULT) -> float:
    """Fraction of ``questions`` whose correct letter X among A–D gives the continuation
    ``"The answer is: X"`` of the prompt (in ``template``'s format) the highest log-likelihood
    (scored on the model's device under ``runtime.autocast()``, one host sync per question)."""
    fmt = prompt_format(tokenizer, template)
    model.eval()
    device = model_device(model)
    letter_ids = [tokenizer(f"The answer is: {x}", add_special_tokens=False)["input_ids"] for x in LETTERS]
    correct = 0
    for q in questions:
        prompt = fmt.prompt_ids(q)
        rows = [prompt + ids for ids in letter_ids]
        width = max(map(len, rows))
        # causal: right padding is inert
        ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=device)
        with runtime.autocast():
            logits = model(input_ids=ids).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        picks = [(j, p - 1, r[p]) for j, r in enumerate(rows) for p in range(len(prompt), len(r))]
        where = [torch.tensor(axis, device=device) for axis in zip(*picks)]
        scores = [0.0] * len(rows)
        for (j, _, _), value in zip(picks, logp[where[0], where[1], where[2]].tolist()):
            scores[j] += value  # summed in the order of the tokens, as one float each
        correct += LETTERS[int(np.argmax(scores))] == q.response
    return correct / max(len(questions), 1)
