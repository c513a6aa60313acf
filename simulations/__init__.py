"""Scenarios (fleets of simulated devices, as TOML files next to this module) and their runner.

`simulations.runner.run_scenario("default")` runs one on Flower's simulation engine; `cutfl simulate`
is its command line. Importing this package does not import Flower.
"""

from pathlib import Path

SCENARIO_DIR = Path(__file__).resolve().parent


def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
