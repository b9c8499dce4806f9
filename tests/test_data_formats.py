"""Data as users bring it: prompt formats (plain and chat templates), files read through Hugging
Face datasets with column mappings, Flower Datasets' partitions, and runs scored at round 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferret import fl
from ferret.fl import experiment, models
from ferret.fl.config import Config, ConfigError
from ferret.fl.data import DataError, Example
from ferret.fl.partitions import PARTITIONS, partition
from ferret.fl.sources import load_examples
from ferret.fl.templates import ChatFormat, PlainFormat, prompt_format

TEMPLATE = Path(__file__).parent / "data" / "chat_template.jinja"  # stories260K has none: the tests give it one
ROWS = [{"instruction": f"Name the number {i}.", "context": "in words" if i % 2 else None,
         "response": f"It is {i}.", "category": ["math", "words", "misc"][i % 3]} for i in range(9)]
EXAMPLES = [Example(r["instruction"], r["response"], r["category"], r["context"] or "") for r in ROWS]


@pytest.fixture(scope="module")
def tokenizer():
    return models.load("stories260k")[1]


# -- prompt formats --------------------------------------------------------------------------------

def test_auto_takes_the_plain_template_without_a_chat_template(tokenizer):
    assert not tokenizer.chat_template
    assert isinstance(prompt_format(tokenizer, "auto"), PlainFormat)
    assert isinstance(prompt_format(tokenizer, str(TEMPLATE)), ChatFormat)
    with pytest.raises(ConfigError, match="template 'chat': the model's tokenizer has no chat template"):
        prompt_format(tokenizer, "chat")
    with pytest.raises(ConfigError, match="template must be one of 'auto', 'chat', 'plain' or the path"):
        Config(template="no/such/template.jinja")


def test_a_template_that_loops_for_hours_is_refused_in_seconds(tokenizer, tmp_path, monkeypatch):
    from ferret.fl import templates

    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.3)
    looping = tmp_path / "loop.jinja"
    looping.write_text("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                       + TEMPLATE.read_text())
    with pytest.raises(ConfigError, match="loop.jinja' took more than 0.3 s to render one conversation"):
        prompt_format(tokenizer, str(looping))


def test_chat_template_masks_exactly_the_non_assistant_tokens(tokenizer):
    fmt = prompt_format(tokenizer, str(TEMPLATE))
    ex = Example("Spell cat backwards.", "tac", "reverse")
    ids, labels = fmt.encode(ex, max_prompt=200, max_length=400)
    conversation = [{"role": "user", "content": ex.instruction}, {"role": "assistant", "content": ex.response}]
    render = TEMPLATE.read_text()
    prompt = tokenizer.apply_chat_template(conversation[:1], chat_template=render, tokenize=False,
                                           add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(conversation, chat_template=render, tokenize=False)
    assert prompt == "<|user|>\nSpell cat backwards.</s>\n<|assistant|>\n" and whole == prompt + "tac</s>\n"
    assert ids == tokenizer(whole, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[n_prompt:]) == "tac</s>\n"
    assert fmt.prompt_ids(ex) == ids[:n_prompt]
    assert fmt.stop_ids == [tokenizer.eos_token_id]  # this template ends a turn with EOS


def test_every_assistant_turn_of_a_conversation_carries_labels(tokenizer):
    fmt = prompt_format(tokenizer, str(TEMPLATE))
    ex = Example("Spell cat backwards.", "tac", "reverse",
                 history=(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")))
    ids, labels = fmt.encode(ex, max_prompt=200, max_length=400)
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    runs.append(current)
    assert [tokenizer.decode(r) for r in runs] == ["Hello</s>\n", "tac</s>\n"]
    assert tokenizer.decode(fmt.prompt_ids(ex)).endswith("Spell cat backwards.</s>\n<|assistant|>\n")


@pytest.mark.parametrize("template", ["plain", str(TEMPLATE)])
def test_a_long_prompt_loses_its_text_not_the_header_that_opens_the_answer(tokenizer, template):
    fmt = prompt_format(tokenizer, template)
    short, long = Example("Count.", "one", "c"), Example("Count. " + "word " * 200, "one", "c")
    ids, labels = fmt.encode(long, max_prompt=24, max_length=64)
    prompt = fmt.prompt_ids(long, 24)
    assert len(prompt) == 24 and ids[:24] == prompt and labels[:24] == [-100] * 24
    header = {"plain": "### Response:\n", str(TEMPLATE): "</s>\n<|assistant|>\n"}[template]
    assert tokenizer.decode(prompt).endswith(header)
    assert ids[24:] == fmt.encode(short, 1000, 2000)[0][len(fmt.prompt_ids(short)):]  # the same answer tokens


def test_plain_format_is_the_papers_template(tokenizer):
    enc = fl.encode([Example("Spell cat backwards.", "tac", "reverse", "a cat")], tokenizer, template="plain")
    prompt = tokenizer("### Instruction:\nSpell cat backwards.\n\n### Input:\na cat\n\n### Response:\n")["input_ids"]
    response = tokenizer("tac", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert enc.input_ids[0] == prompt + response
    assert enc.labels[0] == [-100] * len(prompt) + response


# -- files ----------------------------------------------------------------------------------------

def write_formats(directory: Path, rows: list[dict]) -> list[Path]:
    """``rows`` as .json, .jsonl, .csv, .parquet and a save_to_disk directory."""
    import datasets

    paths = [directory / "d.json", directory / "d.jsonl", directory / "d.csv", directory / "d.parquet",
             directory / "saved"]
    paths[0].write_text(json.dumps(rows))
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = datasets.Dataset.from_list(rows)
    table.to_csv(str(paths[2]), index=False)
    table.to_parquet(str(paths[3]))
    table.save_to_disk(str(paths[4]))
    return paths


def test_every_file_format_loads_the_same_examples(tmp_path):
    for path in write_formats(tmp_path, ROWS):
        assert load_examples(path) == EXAMPLES, path.name


def test_a_column_mapping_reads_other_names(tmp_path):
    renamed = [{"prompt": r["instruction"], "completion": r["response"], "task": r["category"],
                "input": r["context"]} for r in ROWS]
    columns = {"instruction": "prompt", "response": "completion", "category": "task", "context": "input"}
    for path in write_formats(tmp_path, renamed):
        assert load_examples(path, columns) == EXAMPLES, path.name


def test_the_messages_format_loads_conversations(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["response"]}], "task": r["category"]} for r in ROWS]
    want = [Example(e.instruction, e.response, e.category, history=(("system", "Be brief."),)) for e in EXAMPLES]
    paths = write_formats(tmp_path, rows)
    for path in paths[:2] + paths[3:]:  # CSV holds no lists
        assert load_examples(path, {"category": "task"}) == want, path.name


@pytest.mark.parametrize("columns,rows,message", [
    ({"instruction": "prompt"}, ROWS, r"d.jsonl: no column 'prompt' for instruction \(columns: instruction, context, "
                                      r"response, category\)"),
    ({}, [{"prompt": "a", "response": "b"}], r"d.jsonl: no column 'instruction' \(columns: prompt, response\); map one"),
    ({"answer": "response"}, ROWS, r"columns: unknown field 'answer'"),
    ({}, ROWS[:2] + [{"instruction": "x", "response": 3}], r"d.jsonl: record 2: response \(column 'response'\) must "
                                                          r"be text, got int 3"),
    ({}, ROWS[:1] + [{"instruction": "x"}], r"d.jsonl: record 1: response \(column 'response'\) must be text, got "
                                           r"missing"),
    ({}, [{"messages": [{"role": "user", "content": "hi"}]}], r"d.jsonl: record 0: messages must end with a user "
                                                              r"message and the assistant's answer"),
    ({}, [{"messages": [{"role": "pirate", "content": "arr"}]}], r"d.jsonl: record 0: messages\[0\] must be \{role"),
    ({"messages": "messages", "instruction": "q"},
     [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "q": "x"}],
     r"d.jsonl: the records are conversations \(column 'messages'\); columns also maps instruction, which "
     r"conversations do not use: drop it"),
])
def test_bad_columns_and_records_give_one_clear_error(tmp_path, columns, rows, message):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=message):
        load_examples(path, columns)


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("instruction,response,response\nq,a,b\n")
    with pytest.raises(DataError, match="dup.csv: the header names column 'response' twice: rename one"):
        load_examples(path)


def test_unreadable_files_are_named(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "x", "response": \n')
    with pytest.raises(DataError, match="broken.jsonl: cannot be read as JSONL"):
        load_examples(broken)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl: not UTF-8 text \(invalid continuation byte at byte 20\)"):
        load_examples(latin)
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        (tmp_path / "notes.txt").write_text("hi")
        load_examples(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="no data file or saved dataset at"):
        load_examples(tmp_path / "missing.jsonl")


def test_a_run_on_bad_data_writes_nothing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "x", "response": ["not", "text"]}) + "\n")
    out = tmp_path / "run"
    with pytest.raises(DataError, match="record 0: response"):
        experiment.run(Config(data=str(path), rounds=1), out, progress=False, echo=lambda _: None)
    assert not out.exists()


# -- partitions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", PARTITIONS)
def test_every_partition_is_deterministic_and_covers_every_example_once(how):
    examples = fl.synthetic_tasks(30, seed=1)  # 5 categories x 30 examples, each distinct object
    parts = partition(examples, how, 5, seed=3, alpha=0.5, min_per_client=2, shards_per_client=2)
    assert parts == partition(examples, how, 5, seed=3, alpha=0.5, min_per_client=2, shards_per_client=2)
    assert sorted(id(e) for p in parts for e in p) == sorted(map(id, examples))
    assert all(len(p) >= 2 for p in parts)
    position = {id(e): i for i, e in enumerate(examples)}
    assert all([position[id(e)] for e in p] == sorted(position[id(e)] for e in p) for p in parts)  # data order
    if how == "column":
        assert [sorted({e.category for e in p}) for p in parts] == [[c] for c in sorted({e.category for e in examples})]
    if how in ("iid", "dirichlet", "shards"):
        assert parts != partition(examples, how, 5, seed=4, alpha=0.5, min_per_client=2, shards_per_client=2)


@pytest.mark.parametrize("how", PARTITIONS)
def test_partitions_draw_no_progress_bar(how, capfd):
    partition(fl.synthetic_tasks(30, seed=1), how, 5, seed=3)
    assert capfd.readouterr().err == ""


def test_partitions_refuse_what_they_cannot_give():
    examples = fl.synthetic_tasks(4, seed=1)
    with pytest.raises(DataError, match=r"one client per distinct category, and the data holds 5: set clients to 5 "
                                        r"\(6 would need 1 more\)"):
        partition(examples, "column", 6, seed=0)
    with pytest.raises(DataError, match=r"set clients to 5 \(3 would leave out 2 categories\)"):
        partition(examples, "column", 3, seed=0)
    with pytest.raises(DataError, match="20 examples cannot give 30 clients 1 each"):
        partition(examples, "iid", 30, seed=0)
    with pytest.raises(DataError, match="no dirichlet partition of 20 examples over 8 clients gives each 2"):
        partition(examples, "dirichlet", 8, seed=0, alpha=0.05, min_per_client=2)


# -- a run scores its starting model ---------------------------------------------------------------

def test_a_run_records_rouge_l_and_eval_loss_at_round_zero_and_the_end(tmp_path):
    config = Config(algorithm="fedavg", clients=2, rounds=2, steps=2, synthetic_per_family=8, n_eval=10,
                    rouge_samples=4, max_new_tokens=4, partition="iid", template=str(TEMPLATE))
    result = experiment.run(config, tmp_path / "run", progress=False, echo=lambda _: None)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start, end = lines[0], lines[-1]
    assert start["kind"] == "start" and end["kind"] == "end"
    assert 0 <= start["rouge_l"] <= 100 and 0 <= end["rouge_l"] <= 100
    assert result.initial_rouge_l == start["rouge_l"] and result.rounds[-1].rouge_l == end["rouge_l"]
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert f"{start['rouge_l']:.2f} → {end['rouge_l']:.2f}" in summary
    assert f"{start['eval_loss']:.4f} → {end['eval_loss']:.4f}" in summary
