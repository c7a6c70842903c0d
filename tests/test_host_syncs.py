"""Host synchronisations of the training step: a small fixed number, whatever the batch holds.

On a GPU every host sync (``.item()``, ``bool(tensor)``, a blocking device-to-host copy)
stalls the kernel queue. The criterion checks the labels once (one sync), brings the
matching costs of all decoder outputs to the host in one transfer, sends the indices back in
one (non-blocking) copy, and averages the GT count once (``num_masks``).

On the CPU (every machine CI has), the calls that would synchronise on a GPU are counted
with a TorchFunctionMode: ``item``, ``tolist``, ``cpu``, ``bool`` / ``int`` / ``float`` of a
tensor. This over-counts (on the CPU host-side tensors are counted too), so the bound is
conservative. With CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` counts the real ones.
"""
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mask2former_sim.modeling.criterion import BoxSupSetCriterion
from mask2former_sim.modeling.matcher import HungarianMatcher

from test_criterion import HM, K, STRIDE, WEIGHTS, make_info, make_outputs
from test_sim_criterion import SIM_WEIGHTS, sim_criterion, teacher_outputs_like

SYNCING = {"item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__"}


class SyncCounter(TorchFunctionMode):
    """Counts the tensor calls that would wait for a GPU (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def many_targets(batch, gts, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        xy0 = torch.rand(gts, 2, generator=g) * 16
        boxes = torch.cat([xy0, xy0 + 4 + torch.rand(gts, 2, generator=g) * 12], dim=1)
        targets.append({"labels": torch.randint(0, K, (gts,), generator=g).to(device), "boxes": boxes.to(device)})
    return targets


def _to(tree, device):
    if isinstance(tree, torch.Tensor):
        leaf = tree.detach().to(device)
        return leaf.requires_grad_() if tree.requires_grad else leaf
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to(v, device) for v in tree]
    return tree


def criterion_step(crit, batch, gts, device, counter_factory):
    """Forward + backward of the criterion on a batch; returns the counter."""
    crit = crit.to(device)
    outputs = _to(make_outputs(batch, queries=8, num_aux=4), device)
    info = _to(make_info(batch), device)
    teacher = _to(teacher_outputs_like(outputs), device) if crit.needs_teacher else None
    targets = many_targets(batch, gts, device)
    counter = counter_factory()
    with counter:
        losses = crit(outputs, targets, info, iteration=10, teacher_outputs=teacher)
        sum(losses.values()).backward()
    return counter


def box_criterion():
    return BoxSupSetCriterion(K, HungarianMatcher(stride=STRIDE), WEIGHTS, stride=STRIDE, pairwise_warmup_iters=100)


def sim():
    return sim_criterion(warmup=0)


@pytest.mark.parametrize("make", [box_criterion, sim], ids=["box-only", "sim"])
def test_syncing_calls_do_not_grow_with_images_or_gts(make):
    small = criterion_step(make(), 1, 1, "cpu", SyncCounter)
    large = criterion_step(make(), 4, 6, "cpu", SyncCounter)
    assert large.calls == small.calls, (small.calls, large.calls)
    # the label check (bool), num_masks (item), the costs to the host (cpu), and the finite
    # check on the host copy (bool, no sync on a GPU). Before: 27 at 1 image and 57 at 4
    # images x 6 GTs with 5 decoder outputs (per-image label min/max, one transfer per output).
    assert large.total <= 4, large.calls


class CudaSyncCounter:
    """Counts the synchronisations CUDA reports under set_sync_debug_mode("warn")."""

    def __enter__(self):
        torch.cuda.synchronize()
        self._warnings = warnings.catch_warnings(record=True)
        self.records = self._warnings.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)
        self.total = sum("synchroniz" in str(w.message) for w in self.records)
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", [box_criterion, sim], ids=["box-only", "sim"])
def test_cuda_synchronisations_do_not_grow_with_images_or_gts(make):
    criterion_step(make(), 1, 1, "cuda", CudaSyncCounter)  # warm-up: lazy CUDA initialisation
    small = criterion_step(make(), 1, 1, "cuda", CudaSyncCounter)
    large = criterion_step(make(), 4, 6, "cuda", CudaSyncCounter)
    assert large.total == small.total and large.total <= 4, (small.total, large.total)
