"""Progress display for long work (rich), silent when disabled or when nobody watches a terminal."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_enabled(requested: bool = True) -> bool:
    return requested and os.environ.get("CUTFL_NO_PROGRESS") != "1"


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True,
                 plain_lines: int = 4) -> Iterator[Callable[[int, str], None]]:
    """Yields `advance(n, info)`; draws a bar on a terminal and prints about `plain_lines` plain lines elsewhere
    (a log file, `flwr log`)."""
    if not progress_enabled(enabled):
        yield lambda n=1, info="": None
        return
    if not sys.stderr.isatty():
        state = {"done": 0, "next": 0}
        step = max(1, total // max(1, plain_lines))

        def advance_plain(n: int = 1, info: str = "") -> None:
            state["done"] += n
            if state["done"] >= state["next"] or state["done"] == total:
                print(f"{description}: {state['done']}/{total} {info}", file=sys.stderr, flush=True)
                state["next"] = state["done"] + step

        yield advance_plain
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            progress.update(task, advance=n, info=info)

        yield advance
