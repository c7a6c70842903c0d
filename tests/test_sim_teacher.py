"""EMA teacher (mask2former_sim/sim/teacher.py): arithmetic, isolation from the student, state."""
import pytest
import torch
from torch import nn

from mask2former_sim.sim.teacher import EMATeacher


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.ModuleDict({
        "backbone": nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        "predictor": nn.Linear(4, 2),
    })


def _params(module: nn.Module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _perturb(student: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_ema_arithmetic_after_one_and_two_updates():
    student = _student()
    teacher = EMATeacher(student, momentum=0.9)
    t0 = _params(student)  # teacher starts as an exact copy
    for n, p in teacher.module.named_parameters():
        assert torch.equal(p, t0[n])

    _perturb(student, 1)
    s1 = _params(student)
    teacher.update(student)
    t1 = {n: 0.9 * t0[n] + 0.1 * s1[n] for n in t0}
    for n, p in teacher.module.named_parameters():
        torch.testing.assert_close(p, t1[n], rtol=0, atol=1e-6)
        assert not torch.allclose(p, s1[n]) and not torch.allclose(p, t0[n])

    _perturb(student, 2)
    s2 = _params(student)
    teacher.update(student)
    for n, p in teacher.module.named_parameters():
        # 0.9 (0.9 t0 + 0.1 s1) + 0.1 s2 = 0.81 t0 + 0.09 s1 + 0.1 s2
        torch.testing.assert_close(p, 0.81 * t0[n] + 0.09 * s1[n] + 0.1 * s2[n], rtol=0, atol=1e-6)


def test_buffers_are_copied_not_averaged():
    student = _student()
    teacher = EMATeacher(student, momentum=0.9)
    student.train()
    student["backbone"](torch.randn(2, 3, 5, 5) * 3 + 1)  # moves BN running stats
    student["backbone"](torch.randn(2, 3, 5, 5))
    bn_s = student["backbone"][1]
    assert int(bn_s.num_batches_tracked) == 2
    teacher.update(student)
    bn_t = teacher.module["backbone"][1]
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)
    assert torch.equal(bn_t.running_var, bn_s.running_var)
    assert int(bn_t.num_batches_tracked) == 2
    assert bn_t.running_mean.data_ptr() != bn_s.running_mean.data_ptr()  # a copy, not shared


def test_teacher_has_no_grad_and_never_receives_gradients():
    student = _student()
    student["predictor"](torch.randn(1, 4)).sum().backward()  # student holds grads before the copy
    teacher = EMATeacher(student)
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert all(p.grad is None for p in teacher.module.parameters())
    # Poison: a loss that reads the teacher's weights through the student's graph.
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    feats = student["backbone"](x).mean(dim=(2, 3))
    loss = student["predictor"](feats).sum() + teacher.module["predictor"](feats).sum() \
        + teacher.module["backbone"](x).sum()
    loss.backward()
    assert all(p.grad is None for p in teacher.module.parameters())
    assert all(p.grad is not None for p in student.parameters())
    teacher.update(student)
    assert all(not p.requires_grad and p.grad is None for p in teacher.module.parameters())


def test_teacher_is_outside_the_student_module_tree():
    student = _student()
    teacher = EMATeacher(student)
    student_param_ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in student_param_ids for p in teacher.module.parameters())
    teacher_modules = {id(m) for m in teacher.module.modules()}
    assert not any(id(m) in teacher_modules for m in student.modules())
    teacher_ptrs = {t.data_ptr() for t in teacher.state_dict().values()}
    assert not any(t.data_ptr() in teacher_ptrs for t in student.state_dict().values())
    assert set(student.state_dict()) == set(_student().state_dict())  # no teacher keys leaked in
    assert not isinstance(teacher, nn.Module)


def test_student_train_leaves_teacher_in_eval():
    student = _student()
    teacher = EMATeacher(student)
    student.train()
    assert all(not m.training for m in teacher.module.modules())
    assert all(m.training for m in student.modules())
    teacher.update(student)
    assert all(not m.training for m in teacher.module.modules())


def test_call_runs_in_eval_under_no_grad():
    student = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    teacher = EMATeacher(student)
    teacher.module.train()
    before = teacher.module[1].running_mean.clone()
    x = torch.randn(4, 3, requires_grad=True) * 5
    y = teacher(x)
    assert not y.requires_grad
    assert not teacher.module.training
    assert torch.equal(teacher.module[1].running_mean, before)  # eval BN: stats untouched


def test_state_dict_round_trip_is_exact():
    student = _student()
    teacher = EMATeacher(student, momentum=0.5)
    _perturb(student, 3)
    teacher.update(student)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert "backbone.1.num_batches_tracked" in state

    other = EMATeacher(_student(seed=7), momentum=0.5)
    assert not torch.equal(other.state_dict()["predictor.weight"], state["predictor.weight"])
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(not p.requires_grad for p in other.module.parameters())
    assert not other.module.training


def test_load_state_dict_is_strict_and_names_keys():
    teacher = EMATeacher(_student())
    state = dict(teacher.state_dict())
    del state["predictor.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"predictor\.bias.*extra\.weight"):
        teacher.load_state_dict(state)


def test_name_mismatch_raises_with_names():
    teacher = EMATeacher(_student())
    wrapped = nn.ModuleDict({"module": _student()})  # e.g. a DDP-style prefix
    with pytest.raises(ValueError, match=r"backbone\.0\.weight.*module\.backbone\.0\.weight"):
        teacher.update(wrapped)
    smaller = nn.ModuleDict({"backbone": _student()["backbone"]})
    with pytest.raises(ValueError, match=r"predictor\.weight"):
        teacher.update(smaller)
    with pytest.raises(ValueError):
        teacher.reset_from(wrapped)


def test_reset_from_copies_exactly():
    student = _student()
    teacher = EMATeacher(student, momentum=0.99)
    _perturb(student, 4)
    teacher.update(student)
    assert not torch.equal(teacher.module["predictor"].weight, student["predictor"].weight)
    teacher.reset_from(student)
    for (n, p), (_, s) in zip(teacher.module.state_dict().items(), student.state_dict().items()):
        assert torch.equal(p, s), n
    assert all(not p.requires_grad for p in teacher.module.parameters())


def test_momentum_validation_and_to():
    with pytest.raises(ValueError):
        EMATeacher(_student(), momentum=1.5)
    with pytest.raises(TypeError):
        EMATeacher(torch.zeros(1))
    teacher = EMATeacher(_student())
    assert teacher.to("cpu") is teacher
    assert teacher.module["predictor"].weight.device.type == "cpu"
