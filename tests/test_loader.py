"""The positional training stream: resuming at iteration i continues the exact same data."""
import itertools

import numpy as np
import pytest

from mask2former_sim.data.loader import PositionalTrainStream, build_positional_train_loader


def rand_mapper(record):
    # stands in for augmentation: depends on the numpy RNG the stream seeds
    return {"idx": record["idx"], "aug": float(np.random.rand())}


def skipping_mapper(record):
    return None if record["idx"] % 3 == 0 else rand_mapper(record)


RECORDS = [{"idx": i} for i in range(7)]


def take(loader, n):
    return [[(d["idx"], d["aug"]) for d in batch] for batch in itertools.islice(loader, n)]


@pytest.mark.parametrize("mapper", [rand_mapper, skipping_mapper])
def test_resume_continues_the_same_stream(mapper):
    full = take(build_positional_train_loader(RECORDS, mapper, total_batch_size=2, seed=5), 9)
    resumed = take(build_positional_train_loader(RECORDS, mapper, total_batch_size=2, seed=5, start_iter=4), 5)
    assert resumed == full[4:]
    other_seed = take(build_positional_train_loader(RECORDS, mapper, total_batch_size=2, seed=6), 9)
    assert other_seed != full


def test_workers_do_not_change_the_stream():
    single = take(build_positional_train_loader(RECORDS, rand_mapper, total_batch_size=3, seed=1), 6)
    multi = take(
        build_positional_train_loader(RECORDS, rand_mapper, total_batch_size=3, seed=1, num_workers=2), 6
    )
    assert multi == single


def test_each_epoch_is_a_permutation():
    stream = PositionalTrainStream(RECORDS, rand_mapper, batch_size=1, seed=0)
    idx = [stream.map_position(p)["idx"] for p in range(14)]
    assert sorted(idx[:7]) == list(range(7)) and sorted(idx[7:]) == list(range(7))
    assert idx[:7] != idx[7:]


def test_ranks_split_positions():
    streams = [
        PositionalTrainStream(RECORDS, rand_mapper, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)
    ]
    one = PositionalTrainStream(RECORDS, rand_mapper, batch_size=4, seed=0)
    r0, r1 = (list(itertools.islice(iter(s), 2)) for s in streams)
    merged = [r0[0], r1[0], r0[1], r1[1]]
    assert merged == list(itertools.islice(iter(one), 4))


def test_all_skipped_raises():
    stream = PositionalTrainStream(RECORDS, lambda r: None, batch_size=1, seed=0)
    with pytest.raises(RuntimeError, match="consecutive training images were skipped"):
        stream.map_position(0)
    with pytest.raises(ValueError, match="empty"):
        PositionalTrainStream([], rand_mapper, batch_size=1, seed=0)
