"""The dense base model on a device: loaded once per process, decomposed to the device's tasks.

Two transports, named in each ScoringRequest's record:

- `path` (simulation, or devices sharing a model cache): the server names a model directory; the device
  loads it with `cut.checkpoint.load_model` (sha256 checked against the card, `weights_only=True`) and
  checks that sha256 against the one in the request.
- `arrays` (deployment): the server sends the decomposed base weights (backbone + the device's heads) as
  an ArrayRecord with their architecture and arrays sha256; the device verifies, builds and keeps them in
  its store so later phases (distillation teacher, dense evaluation) need no second download.

Loaded models are cached per process (simulation runs many devices per Ray actor).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from cut.checkpoint import load_model, read_card, save_model
from cut.messages import ValidationError
from cut.models import MultiTaskModel
from cut.wire import arrays_sha256
from protocol.records import arrays_state, build_architecture

_FULL: dict[tuple[str, str], MultiTaskModel] = {}
_DECOMPOSED: OrderedDict[tuple[str, tuple[str, ...]], MultiTaskModel] = OrderedDict()
_MAX_DECOMPOSED = 16


def full_model(directory: str, sha256: str) -> MultiTaskModel:
    """The base model in `directory`, which must be the one with weights `sha256`."""
    key = (str(Path(directory).resolve()), sha256)
    if key not in _FULL:
        card = read_card(directory)
        if card.get("weights_sha256") != sha256:
            raise ValidationError(
                f"base model: {directory} holds weights {str(card.get('weights_sha256'))[:12]}..., "
                f"the request names {sha256[:12]}..."
            )
        model, _ = load_model(directory)
        _FULL.clear()  # one base model per process is the norm; do not hoard old ones
        _FULL[key] = model
    return _FULL[key]


def decomposed(sha256: str, tasks: tuple[str, ...], directory: str | None = None) -> MultiTaskModel:
    """The base model reduced to `tasks` (eval mode), from the shared directory or the device store."""
    key = (sha256, tuple(tasks))
    if key in _DECOMPOSED:
        _DECOMPOSED.move_to_end(key)
        return _DECOMPOSED[key]
    if directory is None:
        raise ValidationError("base model: not in this process and no directory to load it from")
    card = read_card(directory)
    if card.get("base_model_sha256") == sha256 and set(card.get("tasks", ())) == set(tasks):
        model, _ = load_model(directory)  # a decomposed base kept in the device store (arrays transport)
    else:
        model = full_model(directory, sha256).decompose(list(tasks))
    model.eval()
    _DECOMPOSED[key] = model
    if len(_DECOMPOSED) > _MAX_DECOMPOSED:
        _DECOMPOSED.popitem(last=False)
    return model


def from_arrays(
    sha256: str, tasks: tuple[str, ...], architecture_json: str, arrays: dict[str, np.ndarray], arrays_sha: str,
    store_dir: Path,
) -> MultiTaskModel:
    """Verify and rebuild a decomposed base sent as arrays; keep it in the device store."""
    if arrays_sha256(arrays) != arrays_sha:
        raise ValidationError("base model: arrays sha256 does not match the request")
    model = build_architecture(architecture_json, "base model")  # bounded, never a raw torch error
    if set(model.task_names) != set(tasks):
        raise ValidationError(f"base model: architecture has heads {model.task_names}, expected {list(tasks)}")
    try:
        model.load_state_dict(arrays_state(arrays), strict=True)
    except (RuntimeError, TypeError) as e:
        raise ValidationError(f"base model: weights do not fit the architecture ({str(e).splitlines()[0]})") from None
    model.eval()
    save_model(store_dir, model, {"base_model_sha256": sha256, "tasks": list(model.task_names)})
    _DECOMPOSED[(sha256, tuple(tasks))] = model
    return model


__all__ = ["decomposed", "from_arrays", "full_model"]
