"""Every script's --help: one usage line, each default shown as the flag takes it (or not at all for an off
switch or an unset value) after the bounds of a bounded type, and an example at the end whose flags the script accepts."""
import argparse
import re
import shlex

import pytest

import centralized
import fedavg
import model_editing
import plan
import summarize

STAGES = {"centralized.py": centralized.get_args, "model_editing.py": model_editing.get_args,
          "fedavg.py": fedavg.get_args}
ENTRY = {**STAGES, "plan.py": plan.main, "summarize.py": summarize.main}


def help_of(script, capsys):
    with pytest.raises(SystemExit) as e:
        ENTRY[script](["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def parser_of(script, monkeypatch):
    """The script's parser, caught as its entry point builds it (get_args/main build it locally)."""
    seen = []
    real = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a, **k: seen.append(self) or real(self, *a, **k))
    with pytest.raises(SystemExit):
        ENTRY[script](["--help"])
    return seen[0]


@pytest.mark.parametrize("script", sorted(ENTRY))
def test_help_has_one_usage_line_and_ends_with_an_example(script, capsys):
    text = help_of(script, capsys)
    assert re.match(r"usage: \S+ \[flags\]", text) and text.split("\n")[1] == ""  # prog: __main__.py in-process
    example = text.rstrip("\n").split("\n")[-2:]
    assert example[0] == "example:" and example[1].startswith(f"  python {script} ")
    if script in STAGES:  # the example is a command the script accepts
        argv = shlex.split(example[1].split("#")[0])[2:]
        assert STAGES[script](argv).out


@pytest.mark.parametrize("script", sorted(ENTRY))
def test_each_default_is_shown_as_the_flag_takes_it(script, capsys, monkeypatch):
    text = " ".join(help_of(script, capsys).split())  # help lines unwrapped
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [" not in text
    for action in parser_of(script, monkeypatch)._actions:
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or not action.help:
            continue
        said = " ".join(action.help.split()).replace("%%", "%")
        if getattr(action.type, "range", None):  # a bounded type (plumbing.rate) says its bounds
            said += f" ({action.type.range})"
        shown = re.search(re.escape(said) + r" \(default: ([^)]*)\)", text)
        assert shown, f"{action.option_strings[0]}: no default shown"
        if isinstance(action.default, list):  # a comma list, which the flag's own type reads back
            assert action.type(shown.group(1)) == action.default, action.option_strings[0]
        elif isinstance(action.default, (int, float)):
            assert float(shown.group(1)) == action.default, action.option_strings[0]


def test_the_grid_learning_rates_show_as_commas(capsys):
    text = " ".join(help_of("centralized.py", capsys).split())
    assert "learning rates of the grid (default: 0.1,0.001,0.005)" in text
