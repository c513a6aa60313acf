"""Argument types shared by every `cutfl` command: each rejects bad input with one readable line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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
