"""`cutfl simulate`: the command lives in simulations/; Flower is imported only when it runs."""

from simulations.cli import add_commands  # noqa: F401
