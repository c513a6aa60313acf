"""Recovery: it distils, shares the teacher pass without changing results, handles unlabelled data, reproduces."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cut.budget import BudgetOptions, make_plan
from cut.compact import compact_model, recalibrate_batchnorm
from cut.data.scenes import scene_tasks
from cut.groups import analyse
from cut.models import ModelConfig, build_model
from cut.recovery import RecoveryConfig, _stage_names, recover, recover_many, recovery_batches
from cut.train import _distill_loss

SHA = "cd" * 32
SIZE = 24


def tiny_teacher(seed: int = 0):
    """A random model whose BatchNorm statistics fit the test images, as a trained model's would."""
    torch.manual_seed(seed)
    cfg = ModelConfig(tasks=scene_tasks(), width=0.125, input_size=(SIZE, SIZE), head_hidden=8, head_dilations=(1,))
    return recalibrate_batchnorm(build_model(cfg), make_batches(seed=99))


def cut_student(teacher, tasks, budget: float = 0.5, seed: int = 0):
    decomposed = teacher.decompose(list(tasks))
    a = analyse(decomposed)
    rng = np.random.default_rng(seed)
    scores = {g.name: rng.random(g.size) for g in a.groups}
    plan = make_plan(scores, a, "params", budget, BudgetOptions(round_to=2, min_channels=2), SHA)
    return recalibrate_batchnorm(compact_model(decomposed, plan), make_batches(seed=99))


def make_batches(n: int = 3, batch: int = 4, seed: int = 0, labelled: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, SIZE, SIZE, generator=g)
        targets = None
        if labelled:
            targets = {
                "seg": torch.randint(0, scene_tasks()[0].num_classes, (batch, SIZE, SIZE), generator=g),
                "depth": torch.rand(batch, 1, SIZE, SIZE, generator=g) + 0.5,
                "normals": torch.nn.functional.normalize(torch.randn(batch, 3, SIZE, SIZE, generator=g), dim=1),
            }
        out.append((images, targets))
    return out


def distill_on(student, teacher, batches) -> float:
    student.eval()
    total = 0.0
    with torch.no_grad():
        for images, _ in batches:
            s, t = student(images), teacher(images)
            total += float(sum(_distill_loss(student.config.task(k), s[k], t[k]) for k in s))
    return total / len(batches)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CFG = RecoveryConfig(steps=12, batch_size=4, lr=3e-3, feature_weight=1.0)


def test_recovery_reduces_distillation_loss():
    teacher = tiny_teacher()
    student = cut_student(teacher, ["seg", "depth"], budget=0.4)
    batches = make_batches()
    before = distill_on(student, teacher, batches)
    cfg = RecoveryConfig(steps=20, batch_size=4, lr=3e-3, distill_weight=1.0, feature_weight=1.0)
    stats = recover(student, teacher, batches, cfg)
    assert distill_on(student, teacher, batches) < 0.8 * before
    assert stats["feature"] is not None and stats["task"] is None  # distill_weight 1: no task loss despite labels
    assert not student.training


def test_recover_many_equals_recover_per_student_bit_for_bit():
    teacher = tiny_teacher()
    students = {"sd": cut_student(teacher, ["seg", "depth"], 0.5), "sdn": cut_student(teacher, ["seg", "depth", "normals"], 0.3),
                "n": cut_student(teacher, ["normals"], 0.6, seed=1)}
    copies = {k: copy.deepcopy(v) for k, v in students.items()}
    batches = make_batches()
    cfg = RecoveryConfig(steps=8, batch_size=4, lr=3e-3, distill_weight=0.7, feature_weight=1.0, head_resolution=True)
    many = recover_many(students, teacher, batches, cfg, seed=3)
    assert {s["teacher_passes"] for s in many.values()} == {len(batches)}  # one teacher pass per batch
    for name, model in copies.items():
        alone = recover(model, teacher, batches, cfg, seed=3)
        assert same(state(model), state(students[name])), name
        assert alone["loss"] == many[name]["loss"]


def test_students_side_by_side_equal_students_in_turn_on_one_thread():
    """`workers` only changes how the cores are shared: with one torch thread the weights are the same bits."""
    teacher = tiny_teacher()
    students = {"sd": cut_student(teacher, ["seg", "depth"], 0.5), "sdn": cut_student(teacher, ["seg", "depth", "normals"], 0.3),
                "n": cut_student(teacher, ["normals"], 0.6, seed=1)}
    copies = {k: copy.deepcopy(v) for k, v in students.items()}
    batches = make_batches()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        in_turn = recover_many(copies, teacher, batches, CFG, seed=3)
        torch.set_num_threads(threads)
        side_by_side = recover_many(students, teacher, batches, CFG, seed=3, workers=2)
        assert torch.get_num_threads() == threads  # restored
    finally:
        torch.set_num_threads(threads)
    for name in students:
        assert same(state(copies[name]), state(students[name])), name
        assert in_turn[name]["loss"] == side_by_side[name]["loss"]
        assert side_by_side[name]["cpu_seconds"] > 0


def test_unlabelled_batches_mean_pure_distillation():
    teacher = tiny_teacher()
    student = cut_student(teacher, ["seg", "normals"], 0.5)
    twin = copy.deepcopy(student)
    cfg = RecoveryConfig(steps=6, batch_size=4, distill_weight=0.5)
    unlabelled = make_batches(labelled=False)
    stats = recover(student, teacher, unlabelled, cfg)
    assert stats["task"] is None and stats["distill"] > 0
    # Images alone and an empty target dict are unlabelled too, and train the same way.
    recover(twin, teacher, [images for images, _ in unlabelled], cfg)
    assert same(state(student), state(twin))
    third = cut_student(teacher, ["seg", "normals"], 0.5)
    recover(third, teacher, [(images, {}) for images, _ in unlabelled], cfg)
    assert same(state(student), state(third))
    # With labels and distill_weight < 1 the task loss is on and the result differs.
    labelled = cut_student(teacher, ["seg", "normals"], 0.5)
    assert recover(labelled, teacher, make_batches(), cfg)["task"] is not None


def test_same_seed_same_weights_other_seed_other_order():
    teacher = tiny_teacher()
    batches = make_batches(n=4)
    a, b, c = (cut_student(teacher, ["seg", "depth"]) for _ in range(3))
    recover(a, teacher, batches, CFG, seed=1)
    recover(b, teacher, batches, CFG, seed=1)
    recover(c, teacher, batches, CFG, seed=2)
    assert same(state(a), state(b))
    assert not same(state(a), state(c))


def test_zero_steps_changes_nothing():
    teacher = tiny_teacher()
    student = cut_student(teacher, ["seg", "depth"])
    before, teacher_before = state(student), state(teacher)
    stats = recover(student, teacher, make_batches(), RecoveryConfig(steps=0, feature_weight=1.0))
    assert stats["steps"] == 0 and stats["lr"] == []
    assert same(before, state(student)) and same(teacher_before, state(teacher))
    assert not student.training


def test_teacher_is_untouched_and_full_teacher_equals_decomposed_teacher():
    teacher = tiny_teacher()
    teacher_before = state(teacher)
    a = cut_student(teacher, ["depth"])
    b = copy.deepcopy(a)
    batches = make_batches()
    cfg = RecoveryConfig(steps=6, batch_size=4, feature_weight=1.0, head_resolution=True)
    recover(a, teacher, batches, cfg)
    recover(b, teacher.decompose(["depth"]), batches, cfg)
    assert same(state(a), state(b))
    assert same(teacher_before, state(teacher)) and not teacher.training


def test_schedule_warms_up_then_decays_to_zero():
    cfg = RecoveryConfig(steps=20, lr=1e-2, warmup_fraction=0.2)
    lrs = [cfg.lr_at(s) for s in range(cfg.steps)]
    assert lrs[:5] == pytest.approx([2e-3, 4e-3, 6e-3, 8e-3, 1e-2])  # linear warm-up over 4 steps
    assert all(x > y for x, y in zip(lrs[4:], lrs[5:], strict=False))  # then cosine decay
    assert lrs[-1] < 0.01 * cfg.lr
    # The optimiser really used these rates.
    teacher = tiny_teacher()
    stats = recover(cut_student(teacher, ["depth"]), teacher, make_batches(n=2), cfg)
    assert stats["lr"] == lrs
    assert RecoveryConfig(steps=10, batch_size=8).budget() == "10 steps x 8"


def test_student_with_a_task_the_teacher_lacks_is_refused():
    teacher = tiny_teacher()
    student = cut_student(teacher, ["seg", "depth"])
    with pytest.raises(ValueError, match="teacher lacks"):
        recover(student, teacher.decompose(["seg"]), make_batches(), CFG)


def test_stage_names_and_recovery_batches():
    teacher = tiny_teacher()
    assert _stage_names(teacher) == [f"backbone.layer{i}" for i in range(1, 5)]
    mobile = build_model(ModelConfig(tasks=scene_tasks(), backbone="mobilenet_v2", width=0.25, input_size=(32, 32)))
    assert _stage_names(mobile)[:3] == ["backbone.features.1", "backbone.features.3", "backbone.features.6"]
    assert _stage_names(mobile)[-1] == "backbone.features.18"

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.full((3, 4, 4), float(i)), {"depth": torch.full((1, 4, 4), float(i))}

    cfg = RecoveryConfig(steps=2, batch_size=3)
    batches = recovery_batches(Tiny(), cfg, seed=0)
    assert [len(x) for x, _ in batches] == [3, 3]
    assert batches == batches and recovery_batches(Tiny(), cfg, seed=0)[0][0].equal(batches[0][0])
    assert all(torch.equal(x[:, :1], y["depth"]) for x, y in batches)
    assert recovery_batches(Tiny(), cfg, seed=0, labelled=False)[0][1] is None
    assert len(recovery_batches(Tiny(), RecoveryConfig(steps=100, batch_size=3))) == 4  # capped by the dataset


def test_normals_distillation_matches_cosine_similarity():
    """The sums-of-squares form (fast on CPU) is the textbook 1 - cosine similarity, value and gradient."""
    import torch.nn.functional as F

    from cut.tasks import TaskSpec
    from cut.train import _distill_loss

    spec = TaskSpec(name="normals", kind="normals")
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 3, 8, 8, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 3, 8, 8, generator=generator)
    ours = _distill_loss(spec, student, teacher)
    reference = (1 - F.cosine_similarity(student, teacher, dim=1)).mean()
    assert torch.allclose(ours, reference, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, student)
    (g_ref,) = torch.autograd.grad(reference, student)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)
