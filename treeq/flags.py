"""Numeric flags with their valid range built in: one mechanism for every command, the recipe and the configs.

A flag's `type=` is a `Number`, which parses the text, refuses NaN, infinities and values outside its
range with one line (argparse turns it into `treeq: error: argument --x: ...`, exit code 2), and
describes its range for docs/CLI-FLAGS.md, which `flags_table` generates from the parser itself so
the table cannot drift from the code. The same object checks values given through the Python API
(`Number.check`), e.g. a recipe's method options read back from config.json.
"""
import argparse
import dataclasses
import math


class Number:
    """An int or float within [low, high] (an open end where `low_open`/`high_open`), always finite;
    `allowed`: the only values accepted inside the range (e.g. the supported bit-widths)."""

    def __init__(self, kind, low=None, high=None, *, low_open=False, high_open=False, allowed=None):
        if kind not in (int, float):
            raise TypeError(f"a Number is an int or a float, not {kind!r}")
        if low is None and high is None:
            raise ValueError("a numeric flag needs at least one bound")
        self.kind, self.low, self.high = kind, low, high
        self.low_open, self.high_open = low_open, high_open
        self.allowed = tuple(allowed) if allowed is not None else None
        self.__name__ = kind.__name__  # argparse names the type in its own messages

    def describe(self):
        """The valid values in words, e.g. 'integer >= 1' or 'number in (0, 1]'."""
        noun = "integer" if self.kind is int else "finite number"
        if self.allowed is not None:
            return f"one of {', '.join(str(v) for v in self.allowed)}"
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{noun} {'<' if self.high_open else '<='} {self.high:g}"

    def invalid_examples(self):
        """Text of values this flag refuses: one out of range, a NaN and an infinity (what the tests feed)."""
        if self.low is not None:
            outside = self.low if self.low_open else self.low - 1
        else:
            outside = self.high if self.high_open else self.high + 1
        return [str(outside), "nan", "inf"]

    def problem(self, value):
        """Why `value` is refused, or None when it is valid."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {self.describe()}, got {value!r}"
        if self.kind is int and value != int(value):
            return f"expected {self.describe()}, got {value!r}"
        if math.isnan(value) or math.isinf(value):
            return f"expected {self.describe()}, got {value!r}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above or (self.allowed is not None and value not in self.allowed):
            return f"expected {self.describe()}, got {value:g}"
        return None

    def check(self, value, name):
        """`value` if valid, else ValueError naming `name` (for values given through the Python API)."""
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
        return value

    def __call__(self, text):
        """argparse type: the parsed value, or ArgumentTypeError (one line) for anything outside the range."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        problem = self.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    def __repr__(self):
        return f"Number({self.describe()})"


def number(kind, low=None, high=None, **options):
    """A `Number` flag type (see Number): `type=number(int, 1)` accepts 1, 2, ... and nothing else."""
    return Number(kind, low, high, **options)


def add_dataclass_arguments(parser, cls, ranges, skip=()):
    """A `--field-name` flag per field of the dataclass `cls` (bools become switches); every numeric field
    must have its Number in `ranges`, so a new config field cannot arrive without a valid range."""
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = f"--{field.name.replace('_', '-')}"
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", default=field.default)
            continue
        if field.type in (int, float, "int", "float"):
            if field.name not in ranges:
                raise ValueError(f"{cls.__name__}.{field.name} has no valid range for its flag {flag}")
            parser.add_argument(flag, type=ranges[field.name], default=field.default)
            continue
        parser.add_argument(flag, default=field.default)


def numeric_actions(parser):
    """[(subcommand, action)] of every flag whose type is a Number, in the order of `--help`."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(name, a) for a in sub._actions if isinstance(a.type, Number)]
    return found


def flags_table(parser):
    """docs/CLI-FLAGS.md: per command, its numeric flags with their valid ranges and defaults."""
    lines = ["# Numeric flags and their valid ranges", "",
             "Generated from the parser (`python scripts/cli_flags.py`; a test keeps it current). A value outside",
             "its range, NaN or an infinity is refused before anything is loaded or written: one line on stderr,",
             "exit code 2.", ""]
    command = None
    for name, action in numeric_actions(parser):
        if name != command:
            command = name
            lines += ["", f"## treeq {name}", "", "| flag | valid values | default |", "|---|---|---|"]
        default = "-" if action.default is None else f"{action.default}"
        lines.append(f"| `{action.option_strings[0]}` | {action.type.describe()} | {default} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"

# A run's floating-point type: "auto" keeps the checkpoint's own (models/dtype.py reads it from the file).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
