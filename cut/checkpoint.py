"""Model directories: `model.json` (the card) + `weights.pt` (a plain state dict).

The card holds everything needed to rebuild the architecture (config and, for a compact model, the
pruning plan), plus where the weights came from and how good they are. Weights are loaded with
`torch.load(weights_only=True)` after their sha256 is checked against the card: no pickled module is
ever loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cut.models import ModelConfig, MultiTaskModel, build_model

CARD_NAME = "model.json"
WEIGHTS_NAME = "weights.pt"
CARD_FORMAT = "cut-fl-model/1"


class NotAModelDir(ValueError):
    """A directory (or file) that is not a cut-fl model."""


def state_dict_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(directory: str | Path, model: MultiTaskModel, card: dict[str, Any] | None = None) -> str:
    """Write weights and card atomically; returns the weights' sha256 (also stored in the card)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = state_dict_bytes(model)
    digest = sha256_bytes(data)
    full_card = {"format": CARD_FORMAT, **(card or {})}
    full_card["config"] = model.config.to_dict()
    full_card["weights_sha256"] = digest
    full_card["weights_bytes"] = len(data)
    atomic_write(directory / WEIGHTS_NAME, data)
    atomic_write(directory / CARD_NAME, json.dumps(full_card, indent=2, sort_keys=True).encode())
    return digest


def read_card(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    card_path = directory / CARD_NAME
    if not directory.is_dir():
        raise NotAModelDir(f"{directory} is not a directory holding a cut-fl model")
    if not card_path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise NotAModelDir(f"{directory} is not a cut-fl model directory (needs {CARD_NAME} and {WEIGHTS_NAME})")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as e:
        raise NotAModelDir(f"{card_path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or "config" not in card:
        raise NotAModelDir(f"{card_path} is not a cut-fl model card (format {CARD_FORMAT!r})")
    return card


def load_state(directory: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read weights.pt after checking its sha256 against the card (or `expected_sha256`)."""
    directory = Path(directory)
    data = (directory / WEIGHTS_NAME).read_bytes()
    expected = expected_sha256 or read_card(directory).get("weights_sha256")
    digest = sha256_bytes(data)
    if expected and digest != expected:
        raise NotAModelDir(f"{directory / WEIGHTS_NAME}: sha256 {digest[:12]}... does not match the card's {expected[:12]}...")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def build_from_card(card: dict[str, Any]) -> MultiTaskModel:
    """Architecture only: config, then the plan's pruning when the card describes a compact model."""
    model = build_model(ModelConfig.from_dict(card["config"]))
    if card.get("plan"):
        from cut.compact import apply_plan
        from cut.plan import PruningPlan

        apply_plan(model, PruningPlan.from_dict(card["plan"]))
    return model


def load_model(directory: str | Path) -> tuple[MultiTaskModel, dict[str, Any]]:
    """Rebuild a model from its card and load its verified weights (eval mode)."""
    card = read_card(directory)
    model = build_from_card(card)
    state = load_state(directory, card.get("weights_sha256"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "shape mismatch"
        raise NotAModelDir(f"{directory}: weights do not fit the architecture in the card ({first})") from None
    model.eval()
    return model, card
