"""A training data stream that is deterministic by position, so that resuming is exact.

detectron2's default loader restarts its sampler and augmentation RNG on resume, so the
images after a resume differ from those an uninterrupted run would have seen. Here every
position p of the global stream (p = iteration * total_batch + k) picks its record from a
seeded per-epoch permutation and seeds the augmentation RNGs from (seed, p). Resuming at
iteration i starts the stream at position i * total_batch, whatever the number of
dataloader workers.
"""
import logging
import random
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from detectron2.utils import comm

logger = logging.getLogger(__name__)

_MAX_RETRIES = 50


def _position_seed(seed: int, position: int, retry: int = 0) -> int:
    return (seed * 1_000_003 + position * 9_176 + retry * 7_919_111) % (2**32)


class PositionalTrainStream(IterableDataset):
    """Infinite stream of mapped training records for one rank.

    Rank r of W takes the global positions start + r, start + r + W, ...; within the rank,
    batch b (of ``batch_size`` consecutive rank positions) is produced by worker b % workers,
    which is the order torch's DataLoader collects worker batches in.
    """

    def __init__(
        self,
        records: Sequence[Dict],
        mapper: Callable[[Dict], Optional[Dict]],
        *,
        batch_size: int,
        seed: int,
        start_position: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if len(records) == 0:
            raise ValueError("the training set is empty")
        self.records = records
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = seed
        self.start_position = start_position
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None

    def _index_at(self, position: int) -> int:
        n = len(self.records)
        epoch = position // n
        if not self.shuffle:
            return position % n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[position % n])

    def map_position(self, position: int) -> Dict:
        """The mapped record at a global stream position (retries deterministically on skip)."""
        index = self._index_at(position)
        for retry in range(_MAX_RETRIES):
            s = _position_seed(self.seed, position, retry)
            # detectron2's augmentations draw from numpy's global RNG
            np.random.seed(s)
            random.seed(s)
            out = self.mapper(self.records[index])
            if out is not None:
                return out
            index = int(np.random.default_rng([self.seed, position, retry]).integers(len(self.records)))
        raise RuntimeError(
            f"{_MAX_RETRIES} consecutive training images were skipped (no box left after "
            "augmentation, or an unreadable image file; see the log): check the dataset and "
            "INPUT.MIN_BOX_SIZE"
        )

    def __iter__(self):
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch = worker_id
        while True:
            for k in range(self.batch_size):
                rank_pos = batch * self.batch_size + k
                position = self.start_position + rank_pos * self.world_size + self.rank
                yield self.map_position(position)
            batch += num_workers


def _trivial_collate(batch: List[Dict]) -> List[Dict]:
    return batch


def build_positional_train_loader(
    records: Sequence[Dict],
    mapper: Callable[[Dict], Optional[Dict]],
    *,
    total_batch_size: int,
    seed: int,
    start_iter: int = 0,
    num_workers: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> DataLoader:
    """Per-rank DataLoader yielding lists of ``total_batch_size / world_size`` mapped records.

    ``rank`` / ``world_size`` default to the process group's (a single process: 0 / 1).
    """
    world = comm.get_world_size() if world_size is None else world_size
    rank = comm.get_rank() if rank is None else rank
    if total_batch_size % world != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be divisible by the number of processes ({world})"
        )
    per_rank = total_batch_size // world
    stream = PositionalTrainStream(
        records,
        mapper,
        batch_size=per_rank,
        seed=seed,
        start_position=start_iter * total_batch_size,
        rank=rank,
        world_size=world,
    )
    return DataLoader(
        stream,
        batch_size=per_rank,
        num_workers=num_workers,
        collate_fn=_trivial_collate,
        persistent_workers=False,
        # a private generator: creating the iterator (again on resume) must not draw from
        # the global torch RNG that the model's point sampling uses
        generator=torch.Generator().manual_seed(seed),
    )
