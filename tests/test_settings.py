"""Every setting and option value is checked before anything runs: a bad one stops `ferret run`
with one line and exit status 2 and leaves the output directory untouched, and the settings
classes refuse it when they are made."""

import pytest

from ferret import fl
from ferret.__main__ import main
from ferret.fl.config import Config, ConfigError, parse_assignments
from ferret.fl.settings import describe, matches

BAD = [  # (algorithm, flags, what the message says)
    ("ferret", ["--option", "budget=0"], "budget must be"),
    ("ferret", ["--option", "budget=-5"], "budget must be"),
    ("ferret", ["--option", "budget=1e12"], "budget must be an integer"),
    ("ferret", ["--option", "budget=1000000000000"], "budget"),
    ("ferret", ["--option", "budget=abc"], "budget must be an integer"),
    ("ferret", ["--option", "allocation=nrm"], "allocation must be one of"),
    ("ferret", ["--option", "grouping=papr"], "unknown grouping 'papr'"),
    ("ferret", ["--option", "grouping=0"], "grouping must be"),
    ("ferret", ["--option", "grouping=-3"], "grouping must be"),
    ("ferret", ["--option", "server_lr=nan"], "server_lr must be a finite number above 0"),
    ("ferret", ["--option", "server_lr=inf"], "server_lr must be a finite number above 0"),
    ("ferret", ["--option", "server_lr=fast"], "server_lr must be a number"),
    ("ferret", ["--option", "clip=-1"], "clip must be a finite number above 0"),
    ("ferret", ["--option", "momentum=1.0"], "momentum must be in [0, 1)"),
    ("ferret", ["--option", "bases=own"], "bases must be one of"),
    ("ferret", ["--option", "basis=srht:100"], "bad Hadamard size"),
    ("ferret", ["--option", "basis=hadamard:100"], "bad Hadamard size"),
    ("ferret", ["--option", "bases=disjoint", "--option", "basis=rademacher"], "bases='disjoint' needs basis='hadamard'"),
    ("ferret", ["--option", "nudge=1"], "unknown option 'nudge'"),
    ("fedzo", ["--option", "eps=0"], "eps must be a finite number above 0"),
    ("fedkseed", ["--option", "k=1000000000000"], "k must be at most"),
    ("fedkseed", ["--option", "k=0"], "k must be at least 1"),
    ("flora", ["--option", "ranks=0"], "ranks must be"),
    ("flora", ["--option", "ranks=-1"], "ranks must be"),
    ("flora", ["--option", "ranks=[]"], "ranks must be"),
    ("flora", ["--option", "ranks=[8,0]"], "ranks must be"),
    ("flora", ["--option", "ranks=2.5"], "ranks must be an integer or a list of integers"),
    ("flora", ["--option", "alpha_per_rank=0"], "alpha_per_rank must be a finite number above 0"),
    ("flora", ["--option", 'target_modules=[""]'], "target_modules must name at least one module"),
    ("fedit", ["--option", "ranks=[8,4]"], "needs one rank for every client"),
    ("ferret", ["--lr", "-0.1"], "lr must be a finite number above 0"),
    ("ferret", ["--lr", "nan"], "lr must be a finite number above 0"),
    ("ferret", ["--lr", "inf"], "lr must be a finite number above 0"),
    ("ferret", ["--batch-size", "-1"], "batch_size must be at least 1"),
    ("ferret", ["--batch-size", "0"], "batch_size must be at least 1"),
    ("ferret", ["--steps", "0"], "steps must be at least 1"),
    ("ferret", ["--steps", "-2"], "steps must be at least 1"),
    ("ferret", ["--grad-accum", "0"], "grad_accum must be at least 1"),
    ("ferret", ["--clip", "0"], "clip must be a finite number above 0"),
    ("ferret", ["--clip", "-1"], "clip must be a finite number above 0"),
    ("ferret", ["--optimizer", "adam"], "optimizer must be one of"),
    ("ferret", ["--seed", "-1"], "seed must be at least 0"),
    ("ferret", ["--rouge-samples", "-1"], "rouge_samples must be at least 0"),
    ("ferret", ["--rouge-samples", "2", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    ("ferret", ["--fraction", "0"], "fraction must be in (0, 1]"),
    ("ferret", ["--alpha", "0"], "alpha must be a finite number above 0"),
    ("ferret", ["--min-per-client", "0"], "min_per_client must be at least 1"),
    ("ferret", ["--weighting", "size"], "weighting must be one of"),
    ("centralized", ["--lr", "-1"], "lr must be a finite number above 0"),
    ("standalone", ["--option", "budget=5"], "standalone takes no options"),
]


@pytest.mark.parametrize("algorithm,flags,message", BAD, ids=[" ".join([a, *f]) for a, f, _ in BAD])
def test_a_bad_value_stops_the_run_with_one_line_and_exit_2(algorithm, flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["run", "--algorithm", algorithm, "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_the_settings_classes_refuse_what_the_cli_refuses():
    with pytest.raises(ValueError, match="budget"):
        fl.Ferret(budget=0)
    with pytest.raises(TypeError, match="budget must be an integer, got True"):
        fl.Ferret(budget=True)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        fl.LocalTraining(steps=0)
    with pytest.raises(ValueError, match="unknown option 'nudge'"):
        fl.build("ferret", nudge=1)
    with pytest.raises(ValueError, match="unknown algorithm 'ferrett'"):
        fl.build("ferrett")
    with pytest.raises(ConfigError, match="fedkseed options: eps must be"):
        Config(algorithm="fedkseed", options={"eps": float("nan")})
    with pytest.raises(TypeError, match="give the options either"):
        fl.Ferret(fl.Ferret.Options(), budget=5)


def test_a_preset_is_its_class_with_fixed_options_users_may_override():
    paper = fl.build("ferret-paper", budget=100)
    assert type(paper) is fl.Ferret and (paper.options.grouping, paper.options.clip, paper.options.budget) == \
        ("paper", 10.0, 100)
    assert fl.build("ferret-paper", clip=2.0).options.clip == 2.0
    assert set(fl.ALGORITHMS["ferret-paper"].option_names) == set(fl.ALGORITHMS["ferret"].option_names)


def test_a_single_target_module_is_a_list_of_one():
    assert fl.FLoRA(target_modules="q_proj").options.modules == ["q_proj"]


def test_assignments_ignore_spaces_and_keep_lists_whole():
    assert parse_assignments(" lr = 0.1, steps=1 ,ranks=[8, 4],basis=srht") == \
        {"lr": 0.1, "steps": 1, "ranks": [8, 4], "basis": "srht"}
    with pytest.raises(ConfigError, match="settings are key=value"):
        parse_assignments("lr")


def test_types_are_checked_as_annotated():
    assert matches(3, float) and not matches(True, int) and not matches(1.5, int) and matches(None, int | None)
    assert matches([1, 2], list[int]) and not matches([1, "2"], list[int]) and matches("x", list[str] | str)
    assert describe(int | None) == "an integer or unset" and describe(list[int]) == "a list of integers"


def test_a_run_without_the_loops_libraries_says_what_to_install(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the `fl` extra were not installed
    status = main(["run", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and "pip install 'ferret-fl[fl]'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
