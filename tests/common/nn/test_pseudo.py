"""Pseudo-labels for unannotated organs (fedseg.common.nn.pseudo), hand-computed on two-voxel volumes."""

from __future__ import annotations

import math

import torch

from fedseg.common.nn.pseudo import folded_distillation


def _logits(*voxels: tuple[float, ...]) -> torch.Tensor:
    """(1, C, N) logits from one tuple of class logits per voxel."""
    return torch.tensor(voxels, dtype=torch.float32).T[None]


def test_target_is_the_teachers_split_between_background_and_unannotated_classes() -> None:
    # 3 classes; the sample annotates class 1 only, so class 2 is folded with background
    student = _logits((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))  # uniform: log p = -log 3 everywhere
    teacher = _logits((math.log(3.0), 5.0, 0.0), (0.0, 0.0, 0.0))
    target = torch.tensor([[0, 1]])  # voxel 0 labelled 0, voxel 1 labelled class 1 (not used)
    annotated = torch.tensor([[True, True, False]])
    # teacher over {0, 2} at voxel 0: 3/(3+1) and 1/(3+1), class 1 dropped; CE vs uniform = log 3
    loss = folded_distillation(student, teacher, target, annotated)
    assert math.isclose(float(loss), math.log(3.0), rel_tol=1e-6)
    # a student that puts 0.75 / 0.25 on classes 0 / 2 (nothing on 1) matches the target: CE = entropy
    student = _logits((math.log(0.75), -30.0, math.log(0.25)), (0.0, 0.0, 0.0))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(float(folded_distillation(student, teacher, target, annotated)), entropy, rel_tol=1e-4)


def test_nothing_to_learn_from_fully_annotated_samples_or_without_zero_voxels() -> None:
    student = _logits((1.0, 2.0, 3.0), (0.5, 0.0, -1.0)).requires_grad_(True)
    teacher = _logits((0.0, 0.0, 9.0), (9.0, 0.0, 0.0))
    full = folded_distillation(student, teacher, torch.tensor([[0, 0]]), torch.tensor([[True, True, True]]))
    assert float(full.detach()) == 0.0
    full.backward()  # attached to the graph, zero gradient
    assert student.grad is not None and float(student.grad.abs().sum()) == 0.0
    none_zero = folded_distillation(student, teacher, torch.tensor([[1, 1]]), torch.tensor([[True, True, False]]))
    assert float(none_zero.detach()) == 0.0


def test_gradient_pulls_the_student_toward_the_teacher_only_within_the_folded_classes() -> None:
    student = torch.zeros(1, 3, 1, requires_grad=True)
    teacher = _logits((0.0, 0.0, 10.0))  # the teacher sees class 2 (unannotated) here
    loss = folded_distillation(student, teacher, torch.tensor([[0]]), torch.tensor([[True, True, False]]))
    loss.backward()
    grad = student.grad
    assert grad is not None
    # d CE / d z = p - t, with p uniform (1/3) and t = (~0, 0, ~1): class 2 up, background and class 1 down
    t2 = math.exp(10.0) / (1.0 + math.exp(10.0))
    expected = torch.tensor([1 / 3 - (1 - t2), 1 / 3, 1 / 3 - t2])
    torch.testing.assert_close(grad[0, :, 0], expected, rtol=1e-5, atol=1e-6)
