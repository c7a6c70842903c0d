"""EMA teacher of SIM, METHOD.md §2 ("Teacher").

The teacher is a deep copy of the student's network (in practice an ``nn.ModuleDict`` of
backbone / pixel decoder / predictor) whose parameters follow the student by an
exponential moving average after every optimizer step::

    θ̃ ← m · θ̃ + (1 − m) · θ          for every floating parameter, m = 0.9999
    β̃ ← β                              for every buffer (BN running stats, num_batches_tracked)

It is deliberately *not* an ``nn.Module`` and not an attribute of the student: the copy
lives in ``EMATeacher.module``, outside the student's module tree, so DDP, ``model.train()``,
the optimizer and the student's ``state_dict`` never see it. Its parameters have
``requires_grad=False`` and the copy is put in eval mode once and stays there (nothing
here ever calls ``train()`` on it; ``__call__`` re-asserts eval and runs under ``no_grad``).

**Construct it after the student's weights are loaded** (fresh initialisation,
``MODEL.WEIGHTS``, backbone pretraining): the copy is taken at construction, and a teacher
copied from un-loaded weights would average towards the loaded student only at the rate
(1 − m) per step — the official code's bug of a teacher never initialised from the
student (METHOD.md §7). ``reset_from`` re-copies the student exactly if the order of
construction cannot be helped.

Parameters and buffers are paired *by name*; a student whose names differ from the
copy's (e.g. wrapped in DDP, which prefixes ``module.``) is an error that names the first
differing names, never a silent positional pairing.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

__all__ = ["EMATeacher"]


def _check_names(kind: str, teacher_names: Sequence[str], student_names: Sequence[str]) -> None:
    if list(teacher_names) == list(student_names):
        return
    for i, (t, s) in enumerate(zip(teacher_names, student_names)):
        if t != s:
            raise ValueError(
                f"EMATeacher: {kind} names differ from the student's at position {i}: "
                f"teacher has {t!r}, student has {s!r} (was the student wrapped, e.g. in DDP, "
                f"after the teacher was built? pass the unwrapped module)"
            )
    n_t, n_s = len(teacher_names), len(student_names)
    extra = (
        f"teacher has extra {teacher_names[n_s]!r}" if n_t > n_s else f"student has extra {student_names[n_t]!r}"
    )
    raise ValueError(
        f"EMATeacher: the teacher has {n_t} {kind}s and the student {n_s}; first unpaired name: {extra}"
    )


class EMATeacher:
    """EMA copy of a student module, outside the student's module tree (so DDP, model.train(), the
    optimizer and the student's state_dict never see it).

    Args:
        student: the module to copy (its current weights are the teacher's step-0 weights:
            build the teacher after the student's weights are loaded).
        momentum: m in θ̃ ← m θ̃ + (1 − m) θ, in [0, 1] (1 freezes the teacher, 0 copies).
    """

    module: nn.Module
    momentum: float

    def __init__(self, student: nn.Module, momentum: float = 0.9999):
        if not isinstance(student, nn.Module):
            raise TypeError(f"EMATeacher needs an nn.Module student, got {type(student).__name__}")
        momentum = float(momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMATeacher momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        module = copy.deepcopy(student)
        for p in module.parameters():
            p.grad = None  # deepcopy also copies any .grad the student holds
        module.requires_grad_(False)
        module.eval()
        self.module = module

    # ------------------------------------------------------------------ pairing
    def _paired(self, student: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor],
                                                     List[torch.Tensor], List[torch.Tensor],
                                                     List[torch.Tensor], List[torch.Tensor]]:
        """(teacher float params, student float params, teacher other params, student other
        params, teacher buffers, student buffers), paired by name."""
        t_params = list(self.module.named_parameters())
        s_params = list(student.named_parameters())
        _check_names("parameter", [n for n, _ in t_params], [n for n, _ in s_params])
        t_bufs = list(self.module.named_buffers())
        s_bufs = list(student.named_buffers())
        _check_names("buffer", [n for n, _ in t_bufs], [n for n, _ in s_bufs])
        tf, sf, to, so = [], [], [], []
        for (_, t), (_, s) in zip(t_params, s_params):
            if t.is_floating_point():
                tf.append(t)
                sf.append(s.detach())
            else:
                to.append(t)
                so.append(s.detach())
        return tf, sf, to, so, [b for _, b in t_bufs], [b.detach() for _, b in s_bufs]

    @staticmethod
    def _copy(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
        if not dst:
            return
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(dst, src)
        else:  # pragma: no cover - torch < 2.1
            for d, s in zip(dst, src):
                d.copy_(s)

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """θ̃ ← m θ̃ + (1 − m) θ for every floating parameter (two foreach calls); every
        buffer and any non-floating parameter copied from the student."""
        tf, sf, to, so, tb, sb = self._paired(student)
        m = self.momentum
        if tf:
            torch._foreach_mul_(tf, m)
            torch._foreach_add_(tf, sf, alpha=1.0 - m)
        self._copy(to, so)
        self._copy(tb, sb)

    @torch.no_grad()
    def reset_from(self, student: nn.Module) -> None:
        """Copy the student's current parameters and buffers exactly (names must match)."""
        tf, sf, to, so, tb, sb = self._paired(student)
        self._copy(tf, sf)
        self._copy(to, so)
        self._copy(tb, sb)

    # ------------------------------------------------------------------ plumbing
    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """Run the teacher network in eval mode under ``no_grad``."""
        if self.module.training:
            self.module.eval()
        return self.module(*args, **kwargs)

    def to(self, device) -> "EMATeacher":
        self.module.to(device)
        return self

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The teacher network's state_dict (parameters and persistent buffers)."""
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strict load; an error names the missing and unexpected keys."""
        expected = set(self.module.state_dict().keys())
        given = set(state.keys())
        missing = sorted(expected - given)
        unexpected = sorted(given - expected)
        if missing or unexpected:
            raise RuntimeError(
                f"EMATeacher.load_state_dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        self.module.load_state_dict(state, strict=True)
        self.module.requires_grad_(False)
        self.module.eval()
