"""Argument types shared by every `cutfl` command: each rejects bad input with one readable line."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

EXIT_USAGE = 2


class CliError(Exception):
    """An error caused by the user's input: printed as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def budget_fraction(text: str) -> float:
    """A budget's value: a number in (0, 1]."""
    try:
        fraction = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget value {text!r} is not a number") from None
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"budget {fraction} is outside (0, 1]")
    return fraction


def parse_budget(text: str) -> tuple[str, float]:
    """'params=0.5' or '0.5' -> ('params', 0.5); the value must lie in (0, 1]."""
    kind, _, value = text.rpartition("=") if "=" in text else ("params", "", text)
    if kind not in ("params", "macs"):
        raise argparse.ArgumentTypeError(f"budget kind {kind!r} is not 'params' or 'macs'")
    return kind, budget_fraction(value)


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {low}")
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True
             ) -> Callable[[str], float]:
    """A finite number in [low, high) (open or closed at either end, as asked)."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    interval = f"{lo}{low:g}, {high:g}{hi}" if math.isfinite(high) else (f"> {low:g}" if low_open else f">= {low:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            raise argparse.ArgumentTypeError(f"{text!r} must be {'in ' if math.isfinite(high) else ''}{interval}")
        return value

    return parse
