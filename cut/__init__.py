"""cut-fl's algorithm: task decomposition, per-task importance, fusion and compaction (pure PyTorch).

Importing `cut` is cheap and never imports Flower; submodules import torch as they need it.
"""

__version__ = "0.1.0"
