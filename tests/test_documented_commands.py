"""Every command of README.md and examples/flower/README.md runs as written, shortened only by
flags appended after it (fewer rounds, steps and records; a temporary output directory). A
command the docs mark "not run in CI" (with the reason, on the comment line above it) is listed
and skipped; installs are checked against pyproject.toml's extras (CI's own install ran them).
The README's Python snippets run as written, with real objects (stories260K, PEFT adapters, a
file in Dolly-15K's format) under the names they leave to the reader."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "examples/flower/README.md")
SHORT_RUN = "--rounds 1 --steps 1 --n-eval 10 --synthetic-per-family 40 --rouge-samples 2 --no-progress"
SHORTER = {  # flags appended to a documented command (the last of a repeated flag wins); {out}: a temporary dir
    "ferret run": f"{SHORT_RUN} --out {{out}}",
    "ferret compare": f"{SHORT_RUN} --out {{out}}",
    "flwr run": "--run-config \"rounds=1 n-eval=10 synthetic-per-family=40 out='{out}'\"",
}


@dataclass
class Command:
    doc: str
    line: int
    text: str
    cwd: str = "."                                # after the block's `cd`s
    env: dict = field(default_factory=dict)       # after the block's `export`s
    not_in_ci: str | None = None                  # the reason the doc gives

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line} {self.text[:60]}"


def bash_blocks(doc: str):
    """(first line number, lines) of each ```bash block of ``doc``."""
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    start = None
    for i, line in enumerate(lines):
        if start is None and line.strip() == "```bash":
            start = i + 1
        elif start is not None and line.strip() == "```":
            yield start + 1, lines[start:i]
            start = None


def documented_commands() -> list[Command]:
    """Every command line of the docs' bash blocks, continuation lines joined, `&&` chains split."""
    commands = []
    for doc in DOCS:
        for first, lines in bash_blocks(doc):
            cwd, env, reason, i = ".", {}, None, 0
            while i < len(lines):
                number, text = first + i, lines[i]
                while text.rstrip().endswith("\\"):
                    i += 1
                    text = text.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
                text = re.sub(r"\s+#[^'\"]*$", "", text).strip()  # a trailing comment
                if text.startswith("#"):
                    found = re.search(r"not run in CI(.*)", text)
                    reason = found.group(1).strip(" :") if found else reason
                    continue
                if not text:
                    reason = None
                    continue
                for part in (p.strip() for p in text.split("&&")):
                    if part.startswith("cd "):
                        cwd = part[3:].strip()
                    elif part.startswith("export "):
                        env.update(dict(kv.split("=", 1) for kv in shlex.split(part[7:])))
                    else:
                        commands.append(Command(doc, number, part, cwd, dict(env), reason))
                reason = None if not text.endswith("&") else reason
    return commands


COMMANDS = documented_commands()
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_the_docs_hold_the_commands_a_newcomer_needs():
    texts = [c.text for c in COMMANDS]
    assert texts[:2] == ['pip install torch==2.13.0', 'pip install ".[fl]"'] and texts[2] == "ferret run"
    assert "python -m pytest tests -q" in texts and any(t.startswith("flwr run .") for t in texts)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0 && pip install \".[test]\" && python -m pytest tests -q" in ci


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_a_documented_command_runs_as_written(command, tmp_path):
    if command.not_in_ci is not None:
        pytest.skip(f"the docs say: not run in CI: {command.not_in_ci}")
    words = shlex.split(command.text)
    if words[:2] == ["pip", "install"]:  # CI's own install ran it: the extras it names must exist
        for spec in words[2:]:
            extras = re.fullmatch(r"\.\[([\w,]+)\]", spec)
            assert extras or re.fullmatch(r"torch==[\d.]+", spec), spec
            assert extras is None or set(extras.group(1).split(",")) <= set(EXTRAS), spec
        return
    if command.text == "python -m pytest tests -q":
        return  # this suite: CI's command
    program = next((p for p in SHORTER if command.text.startswith(p)), None)
    assert program is not None, f"{command.id}: no rule to shorten it; mark it 'not run in CI' with a reason"
    out = tmp_path / "out"
    text = f"{command.text} {SHORTER[program].format(out=out)}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_HOME": str(tmp_path / "flwr"), **command.env}
    before = _superlinks()
    try:
        proc = subprocess.run(["bash", "-c", text], cwd=ROOT / command.cwd, env=env, capture_output=True, text=True,
                              timeout=900)
    finally:
        for pid in _superlinks() - before:  # `flwr run` leaves the SuperLink it started running
            subprocess.run(["kill", str(pid)], check=False)
    output = proc.stdout + proc.stderr
    print(f"ran: cd {command.cwd} && {text}")
    assert proc.returncode == 0, output[-3000:]
    if program == "flwr run":  # flwr run exits 0 when the run fails: its streamed log says so
        assert "ERROR" not in output, output[-3000:]
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out / "model")  # the model it wrote loads as the README says
    elif program == "ferret run":
        assert (out / "summary.md").is_file() and "done: eval loss" in output
    else:
        assert (out / "table.md").is_file()


def _superlinks() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


if __name__ == "__main__":
    for c in COMMANDS:
        print(c.id, "|", c.cwd, c.env, c.not_in_ci)
    sys.exit(0)


# -- the README's Python snippets, run with real objects under the names they leave to the reader --
def python_blocks(doc: str = "README.md") -> list[tuple[int, str]]:
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    blocks, start = [], None
    for i, line in enumerate(lines):
        if start is None and line.strip() == "```python":
            start = i + 1
        elif start is not None and line.strip() == "```":
            blocks.append((start + 1, "\n".join(lines[start:i])))
            start = None
    return blocks


def _stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ferret.fl.models import stories260k_dir

    return AutoModelForCausalLM.from_pretrained(stories260k_dir()), AutoTokenizer.from_pretrained(stories260k_dir())


def _projection_names(tmp_path):
    import ferret

    model, _ = _stories()
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()}
    packets = [ferret.compress(delta, seed=s, budget=512) for s in (1, 1, 2)]
    return dict(delta=delta, round_seed=7, model=model, server_lr=1.0, seed=3, eps=1e-3, client_packets=packets,
                example_counts=[10, 20, 30])


def _round_names(tmp_path):
    import ferret

    model, _ = _stories()
    updates = [{n: 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(3)]
    rnd = ferret.Round(seed=7, clients=3, budget=3800)
    uploads = [rnd.compress(u, client=c).to_bytes() for c, u in enumerate(updates)]
    snapshot = {n: p.detach() - updates[0][n] for n, p in model.named_parameters()}
    return dict(delta=updates[0], round_seed=7, model=model, server_lr=1.0, uploads=uploads,
                example_counts=[10, 20, 30], snapshot=snapshot)


def _lora_names(tmp_path):
    from peft import LoraConfig, get_peft_model

    from ferret import lora

    clients = []
    for rank in (8, 4, 2):
        peft = get_peft_model(_stories()[0], LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        clients.append(peft)
    equal = [get_peft_model(_stories()[0], LoraConfig(r=4, target_modules=["q_proj"])) for _ in range(3)]
    return dict(client_peft_models=clients, example_counts=[10, 20, 30], base_model=_stories()[0],
                fresh_base=_stories()[0], weights=[1.0, 2.0, 3.0],
                equal_rank_adapters=[lora.from_peft(m) for m in equal])


def _loop_names(tmp_path):
    from ferret.fl import synthetic_tasks

    # the snippet's Dolly file: Dolly-15K's format, written here (the real one is not in the repository)
    rows = [{"instruction": ex.instruction, "context": "", "response": ex.response, "category": ex.category}
            for ex in synthetic_tasks(60, seed=0)]
    (tmp_path / "databricks-dolly-15k.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model, tokenizer = _stories()
    return dict(model=model, tokenizer=tokenizer)


NAMES = {"ferret.Round": _round_names, "ferret.compress": _projection_names, "from ferret import lora": _lora_names, "fl.holdout": _loop_names}


@pytest.mark.parametrize("line, code", python_blocks(), ids=[f"README.md:{n}" for n, _ in python_blocks()])
def test_a_readme_python_snippet_runs(line, code, tmp_path, monkeypatch):
    key = next((k for k in NAMES if k in code), None)
    assert key is not None, f"README.md:{line}: no objects for this snippet's names"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    names = NAMES[key](tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), names)
