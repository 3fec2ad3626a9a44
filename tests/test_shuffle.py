"""The pipeline's shuffles: whole-shard permutations per epoch and window shuffles of a stream,
deterministic and exactly resumable, and (the bug they fix) never grain's index_shuffle on small
shards, where it cost up to 6.7 ms a call (a window of 4) and was most of the pipeline's time."""

import grain
import numpy as np
import pytest

from t5lite.data import pipeline as pl
from t5lite.data import shuffle
from tests.test_pipeline import LENGTHS, assert_same, docs, take


def window_stream(n, window, seed=0):
    return shuffle.WindowShuffleIterDataset(grain.MapDataset.range(n).to_iter_dataset(), window_size=window, seed=seed)


def test_window_shuffle_permutes_each_window_and_depends_on_the_seed():
    out = list(window_stream(23, 5))
    assert len(out) == 23
    for start in range(0, 23, 5):  # every window is a permutation of its own elements (the last is short)
        assert sorted(out[start:start + 5]) == list(range(start, min(start + 5, 23)))
    assert out != list(range(23))
    assert out == list(window_stream(23, 5))
    assert out != list(window_stream(23, 5, seed=1))
    windows = [tuple(np.argsort(out[s:s + 5])) for s in range(0, 20, 5)]
    assert len(set(windows)) > 1  # each window draws its own order


@pytest.mark.parametrize("stop", range(0, 24))
def test_window_shuffle_resumes_at_every_position(stop):
    full = list(window_stream(23, 5))
    it = iter(window_stream(23, 5))
    head = [next(it) for _ in range(stop)]
    state = it.get_state()
    resumed = iter(window_stream(23, 5))
    resumed.set_state(state)
    assert head + list(resumed) == full


def test_small_shuffle_is_a_fresh_permutation_every_epoch():
    ds = shuffle.shuffle_map(grain.MapDataset.range(10), seed=3).repeat(3)
    epochs = [[ds[e * 10 + i] for i in range(10)] for e in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    again = shuffle.shuffle_map(grain.MapDataset.range(10), seed=3).repeat(3)
    assert [again[i] for i in range(30)] == sum(epochs, [])
    assert [ds[i] for i in (25, 3, 14)] == [epochs[2][5], epochs[0][3], epochs[1][4]]  # random access


def test_large_shards_keep_grains_index_shuffle():
    large = shuffle.shuffle_map(grain.MapDataset.range(shuffle.LARGE_SHARD + 1), seed=0)
    assert isinstance(large, type(grain.MapDataset.range(4).shuffle(seed=0)))


def test_small_shards_never_call_index_shuffle(monkeypatch):
    """Fails on the pipeline that used grain's shuffles: 32 shards of a 100-document source (3 documents
    each) and a 128-chunk window split into windows of 4."""
    from grain._src.python.dataset.transformations import shuffle as grain_shuffle

    def forbidden(*args, **kwargs):
        raise AssertionError("index_shuffle on a small shard")
    monkeypatch.setattr(grain_shuffle.index_shuffle, "index_shuffle", forbidden)
    def build():
        return pl.make_pipeline(docs(100), [pl.split_tokens(6), with_inputs], feature_lengths=LENGTHS,
                                batch_size=32, seed=0, process_index=0, process_count=1)
    assert_same(take(build(), 3), take(build(), 3))


def with_inputs(example, rng):
    return {"inputs": example["targets"][::-1].copy(), "targets": example["targets"]}
