"""Command-line argument parsing shared by `tokfleet` (launch/cli.py) and `python -m trainer` (trainer/entry.py)."""

from __future__ import annotations

import argparse

from core.schema import bound_text, within


class CommandLineParser(argparse.ArgumentParser):
    """argparse whose errors read like every other input error: one line, exit code 2 (not usage + error)."""

    def error(self, message: str):
        self.exit(2, f"tokfleet: error: {message} (see `{self.prog} --help`)\n")


def _number_argument(kind: type, bound: str):
    """An argparse type: a `kind` number within `bound` (as core.schema.within reads it)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not within(value, bound):
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} {bound_text(bound)}, got {text!r}")
        return value

    return parse


positive_int = _number_argument(int, ">= 1")  # counts and lengths
non_negative_int = _number_argument(int, ">= 0")  # seeds
non_negative_float = _number_argument(float, ">= 0")  # temperatures
