"""cut-fl's algorithm: task decomposition, per-task importance, fusion and compaction (pure PyTorch).

Importing `cut` is cheap and never imports Flower; submodules import torch as they need it.

The Python API (`cut.api`): `cut.prune` prunes your own multi-task model in one call; `cut.score`,
`cut.fuse`, `cut.plan` and `cut.build_compact` are CUT's federated steps one at a time;
`cut.save_compact` / `cut.load_compact` store a compact model without pickle. `cut.plan` is the
function: the PruningPlan dataclass is still imported as `from cut.plan import PruningPlan`.
"""

from cut.api import PruneReport, build_compact, fuse, load_compact, plan, prune, save_compact, score

__version__ = "0.1.0"

__all__ = ["PruneReport", "build_compact", "fuse", "load_compact", "plan", "prune", "save_compact", "score"]
