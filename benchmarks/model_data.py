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


def dense_and_plans(model_dir: Path, tasks: list[str], budgets: list[float], kind: str = "latency",
                    cached_table: bool = False):
    """(card, table, [(name, model)]): the decomposed dense model, then its compact models planned by `kind`
    (latency: against `table`, measured now or the cached one; None for other kinds) for each budget, all from fisher scores on the same 4
    batches of 32 train samples (method cut, as `cutfl prune`)."""
    import torch

    from cut.budget import BudgetOptions
    from cut.compact import compact_model
    from cut.groups import analyse
    from cut.importance import score_tasks
    from cut.latency import table_for
    from cut.pipeline import RecoveryConfig, seed_data
    from cut.planner import plan_from_scores

    torch.set_num_threads(1)
    base, card, train, _ = load_model_and_data(model_dir, 256, 1)
    dense = base.decompose(tasks).eval()
    data = seed_data(train, 0, 32, 4, RecoveryConfig(steps=1, batch_size=32))
    per_task = score_tasks(dense, data.scoring, tasks, "fisher", len(data.scoring), 0)
    table = table_for(dense, card["weights_sha256"], refresh=not cached_table) if kind == "latency" else None
    options = BudgetOptions(latency=table)
    analysis = analyse(dense)
    return card, table, [("dense", dense)] + [
        (f"{kind}={f}", compact_model(dense, plan_from_scores(per_task, analysis, kind, f, options=options,
                                                              method="cut")).eval())
        for f in budgets]
