"""What machine a benchmark ran on, for the BENCHMARKS.md header of each figure."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_result(out: Path, text: str, payload: dict) -> None:
    """Print a benchmark's table and keep it beside its data: `out`.md (the table) and `out`.json (the payload
    with the date and this machine's CPU)."""
    import json
    from datetime import date

    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"date": str(date.today()), "machine": cpu_model(), **payload},
                                                   indent=1))
