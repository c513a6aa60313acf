"""A pre-trained model directory and its dataset's train / test samples, as the latency benchmarks load them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path


def load_model_and_data(model_dir: Path, train_samples: int, test_samples: int, input_size: int | None = None):
    """(base model, its card, train Samples, test Samples) from the card's dataset and its split settings.

    `input_size`: run the model (and render its data) at this square size instead of the trained one; the
    models are fully convolutional, so the same weights run at another size."""
    from cut.checkpoint import load_model
    from cut.data import get_dataset
    from cut.pipeline import Samples

    base, card = load_model(model_dir)
    kwargs = {k: v for k, v in card.get("dataset_kwargs", {}).items() if k != "num_samples"}
    test_kwargs = {k: v for k, v in card.get("test_kwargs", {}).items() if k != "num_samples"}
    if input_size:
        if "size" not in kwargs:
            raise SystemExit(f"--input-size: dataset {card['dataset']!r} takes no size")
        base.config = replace(base.config, input_size=(input_size, input_size))
        kwargs["size"] = test_kwargs["size"] = input_size
    train = Samples.from_dataset(get_dataset(card["dataset"], "train", num_samples=train_samples, **kwargs))
    test = Samples.from_dataset(get_dataset(card["dataset"], "test", num_samples=test_samples, **test_kwargs))
    return base, card, train, test
