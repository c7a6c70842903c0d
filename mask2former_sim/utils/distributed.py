"""Collective decisions: every rank takes the same branch, so none is left waiting.

A check that raises on one rank only (a bad label, a non-finite cost) leaves the other ranks
blocked in the next collective (an all-reduce of the loss normaliser, DDP's gradient
all-reduce) until the NCCL timeout. ``flagged_ranks`` lets every rank learn which ranks
flagged a problem, so all of them raise together.

Every rank must call these functions at the same point (they are collectives whenever
torch.distributed is initialised with more than one process); in a single process they are
local and cost nothing.

``process_group_timeout`` turns ``DIST_TIMEOUT_MINUTES`` into the timeout train_net.py gives
the process group (detectron2's ``launch``), so that a collective whose peer died or hangs
raises instead of blocking for ever.
"""
import datetime
import os
from typing import List, Union

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (and mpi) reduce CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def flagged_ranks(flag: Union[bool, torch.Tensor]) -> List[int]:
    """Ranks (sorted) whose ``flag`` is true; ``[0]`` or ``[]`` in a single process."""
    local = bool(flag.any()) if isinstance(flag, torch.Tensor) else bool(flag)
    if not _distributed():
        return [0] if local else []
    world, rank = dist.get_world_size(), dist.get_rank()
    flags = torch.zeros(world, dtype=torch.int32, device=_collective_device())
    flags[rank] = int(local)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [r for r, f in enumerate(flags.tolist()) if f]


def any_rank(flag: Union[bool, torch.Tensor]) -> bool:
    """True on every rank when ``flag`` is true on at least one (an all-reduce with MAX)."""
    return bool(flagged_ranks(flag))


def other_rank_error(ranks: List[int], what: str) -> str:
    """Message for the ranks that are fine but stop because ``ranks`` met ``what``."""
    return f"rank(s) {ranks} met {what}; stopping this rank too (see that rank's error for details)"


def process_group_timeout(minutes: float) -> datetime.timedelta:
    """The process group's timeout for ``DIST_TIMEOUT_MINUTES`` (> 0).

    gloo applies it to every collective (a peer that died usually fails the collective at
    once, through its closed connection; a peer that is alive but never joins fails it after
    the timeout). NCCL needs its watchdog to act on it: ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` is
    set to 1 (abort the communicator and end the process) unless the environment sets it
    already; call this before the processes are spawned, they inherit the variable.
    """
    minutes = float(minutes)
    if not minutes > 0:
        raise ValueError(f"DIST_TIMEOUT_MINUTES must be > 0 (minutes), got {minutes}")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    return datetime.timedelta(minutes=minutes)
