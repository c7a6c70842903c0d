"""Peak memory of the training process into the EventStorage (so into metrics.json and
TensorBoard as ``peak_memory_mib``), for tools/compare_runs.py.

CUDA: ``torch.cuda.max_memory_allocated`` of the current device (the tensors' peak, no
host sync); CPU: the process's maximum resident set size (``ru_maxrss``), which includes
the Python interpreter, the model and the data pipeline.
"""
import resource

import torch
from detectron2.engine import HookBase

__all__ = ["PeakMemoryHook", "peak_memory_mib"]


def peak_memory_mib(device) -> float:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class PeakMemoryHook(HookBase):
    """Put ``peak_memory_mib`` after every step (register it before the PeriodicWriter)."""

    def __init__(self, device):
        self._device = torch.device(device)

    def after_step(self):
        self.trainer.storage.put_scalar("peak_memory_mib", peak_memory_mib(self._device), smoothing_hint=False)
