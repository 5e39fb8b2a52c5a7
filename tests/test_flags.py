"""Every numeric flag of every command: its range is built in, refused values end in one line and exit 2."""
import argparse
from pathlib import Path

import pytest

from treeq.cli import build_parser, main
from treeq.flags import Number, flags_table, number, numeric_actions

DOC = Path(__file__).resolve().parent.parent / "docs" / "CLI-FLAGS.md"


def _required(command, tmp_path):
    """The smallest argv of `command`: a value for each of its required arguments (all inside tmp_path)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    argv = [command]
    for action in sub._actions:
        if not action.required:
            continue
        value = action.choices[0] if action.choices else "DiT-S/8" if action.dest == "size" else str(tmp_path / "x")
        argv += [value] if not action.option_strings else [action.option_strings[0], value]
    return argv


CASES = [(command, action.option_strings[0], value)
         for command, action in numeric_actions(build_parser()) for value in action.type.invalid_examples()]


def test_every_command_has_its_numeric_flags_checked():
    commands = {command for command, _, _ in CASES}
    assert {"train", "sample", "eval", "init", "quantize", "finetune", "bench", "demo", "search"} <= commands
    flags = {(command, flag) for command, flag, _ in CASES}
    assert {("quantize", "--branch-ratio"), ("quantize", "--gptq-damp"), ("quantize", "--percentile"),
            ("finetune", "--lr"), ("search", "--queue-size"), ("sample", "--cfg-scale")} <= flags
    # and no flag of any command parses a number without a range
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                plain = [a.option_strings for a in sub._actions if a.type in (int, float)]
                assert not plain, (command, plain)


@pytest.mark.parametrize("command, flag, value", CASES)
def test_out_of_range_nan_and_inf_are_one_line_exit_2_nothing_written(command, flag, value, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*_required(command, tmp_path), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("treeq: error:") and flag in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_docs_table_is_generated_from_the_parser():
    assert DOC.read_text() == flags_table(build_parser()), "run: python scripts/cli_flags.py"


def test_number_describes_and_checks_its_range():
    ratio = number(float, 0, 1, low_open=True)
    assert ratio.describe() == "finite number in (0, 1]" and ratio("0.5") == 0.5
    for text in ("0", "1.5", "nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            ratio(text)
    with pytest.raises(ValueError, match="monarch ratio: expected"):
        ratio.check(float("nan"), "monarch ratio")
    assert number(int, 1)("3") == 3 and isinstance(number(int, -1), Number)
    with pytest.raises(argparse.ArgumentTypeError):
        number(int, 1)("2.5")


def test_a_recipe_read_back_refuses_out_of_range_options():
    from treeq.ptq.recipe import Recipe
    with pytest.raises(ValueError, match="lowrank option ratio"):
        Recipe(methods="lowrank", method_options={"lowrank": {"ratio": float("nan")}})
    with pytest.raises(ValueError, match="percentile"):
        Recipe(percentile=float("inf"))
