"""Server-side recovery (server.recovery): every distinct plan distilled from the dense model on the
server's own data before delivery, kept in the run directory, and never worse at matching the teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_federation import tiny_model_dir

from cut.budget import BudgetOptions
from cut.compact import compact_model
from cut.data import get_dataset
from cut.messages import Budget
from cut.recovery import recovery_batches
from cut.train import _distill_loss
from protocol.records import arrays_state
from server.planning import BaseModel, PlanBook
from server.recovery import recover_plans, recovery_dataset
from server.rundir import RunState
from server.settings import RecoverySettings

SUBSETS = (("seg",), ("depth", "normals"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return BaseModel.load(tiny_model_dir(tmp_path_factory.mktemp("recovery")))


def _book(base: BaseModel) -> PlanBook:
    """Two plans (different task subsets) at 0.4 of the parameters, from magnitude-like random scores."""
    book = PlanBook(base, BudgetOptions(min_channels=4, round_to=4), "global")
    rng = np.random.default_rng(0)
    for tasks in SUBSETS:
        analysis = base.analysis(tasks)
        per_task = {t: {g.name: rng.random(g.size).astype(np.float32) + 0.1 for g in analysis.groups_of_task(t)}
                    for t in tasks}
        book.build(book.plan(tasks, Budget("params", 0.4), per_task, {}))
    return book


def _teacher_gap(base: BaseModel, book: PlanBook, plan_hash: str) -> float:
    """Distillation loss of a plan's current weights against the dense model on held-out scenes."""
    build = book.builds[plan_hash]
    student = compact_model(base.decomposed(build.plan.tasks), build.plan)
    student.load_state_dict(arrays_state(build.arrays))
    student.eval()
    data = get_dataset("scenes", "test", num_samples=32, size=32, seed=5)
    images = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        out, ref = student(images), base.model(images)
    return float(sum(_distill_loss(student.config.task(t), out[t], ref[t]) for t in build.plan.tasks))


def test_recovery_brings_every_plan_closer_to_the_teacher_and_is_kept(base, tmp_path):
    book = _book(base)
    before = {h: _teacher_gap(base, book, h) for h in book.builds}
    settings = RecoverySettings(samples=64, steps=30, batch_size=16)
    state = RunState(tmp_path / "out", base.sha256, "t", resume=False)
    report = recover_plans(book, base, settings, state)
    assert report["recovered"] == 2 and report["resumed"] == 0 and report["budget"] == "30 steps x 16"
    for plan_hash in book.builds:
        after = _teacher_gap(base, book, plan_hash)
        assert after < 0.8 * before[plan_hash], (plan_hash, before[plan_hash], after)
        kept = state.kept_recovered(plan_hash)
        assert kept is not None and all(np.array_equal(kept[k], v) for k, v in book.builds[plan_hash].arrays.items())
    # A resumed run reuses every kept plan instead of recovering again.
    again = _book(base)
    resumed = recover_plans(again, base, settings, RunState(tmp_path / "out", base.sha256, "t", resume=True))
    assert resumed["recovered"] == 0 and resumed["resumed"] == 2
    assert {h: b.weights_sha256 for h, b in again.builds.items()} == {h: b.weights_sha256 for h, b in book.builds.items()}


def test_zero_steps_delivers_the_pruned_weights(base):
    book = _book(base)
    before = {h: b.weights_sha256 for h, b in book.builds.items()}
    assert recover_plans(book, base, RecoverySettings(steps=0))["recovered"] == 0
    assert {h: b.weights_sha256 for h, b in book.builds.items()} == before


def test_recovery_data_is_the_pretraining_split_or_unlabelled_images(base, tmp_path):
    pretrain = recovery_dataset(RecoverySettings(), base)
    image, targets = pretrain[0]
    assert image.shape == (3, 32, 32) and set(targets) == {"seg", "depth", "normals"}
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = recovery_dataset(RecoverySettings(data=str(tmp_path)), base)
    assert len(folder) == 3
    image, targets = folder[2]
    assert image.shape == (3, 32, 32) and targets == {}
    assert torch.allclose(image, torch.full_like(image, (80 / 255 - 0.45) / 0.25))  # the scenes normalisation
    batches = recovery_batches(folder, RecoverySettings(batch_size=2).config(), num_samples=3, labelled=False)
    assert [b[0].shape[0] for b in batches] == [2, 1] and all(b[1] is None for b in batches)
    with pytest.raises(FileNotFoundError):
        recovery_dataset(RecoverySettings(data=str(tmp_path / "missing")), base)
