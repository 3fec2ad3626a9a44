"""Seeded shuffles for the pipeline: a whole shard per epoch, and a window of a stream.

grain's ShuffleMapDataset and WindowShuffleIterDataset draw every position from
`index_shuffle(i, max_index=n - 1, ...)`, whose cost grows as n shrinks (measured on this
project's 2-core CPU, grain 0.2.18: 7 us a call at n = 60,000, 30 us at 1,900, 450 us at 100,
6.7 ms at 4). A virtual shard's slice of a small source, or a window of 128 / 32 shards = 4
chunks, made the shuffle most of the pipeline's time. Below LARGE_SHARD elements a numpy
permutation (cached per epoch / drawn per window) costs microseconds; above it index_shuffle is
cheap and needs no O(n) memory, so large shards keep it.
"""

from __future__ import annotations

import copy

import grain
import numpy as np

LARGE_SHARD = 1 << 16  # elements; above it grain's index_shuffle (~7 us a call, no per-epoch array)


def _permutation(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, n]).permutation(n)  # [n]


def shuffle_map(ds: grain.MapDataset, seed: int) -> grain.MapDataset:
    """`ds` reshuffled every epoch (after `.repeat`, element k of epoch e is ds[perm_e[k]])."""
    return ds.shuffle(seed=seed) if len(ds) > LARGE_SHARD else _SmallShuffleMapDataset(ds, seed)


class _SmallShuffleMapDataset(grain.MapDataset):
    """A per-epoch permutation of a small parent, epoch e seeded by (seed + e, len); the last epoch's
    permutation is cached."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed, self._cache = int(seed), (None, None)

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"SmallShuffleMapDataset(seed={self._seed})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        epoch, position = divmod(index, n)
        if self._cache[0] != epoch:
            self._cache = (epoch, _permutation((self._seed + epoch) % 2**32, n))
        return self._parent[int(self._cache[1][position]) + epoch * n]


class WindowShuffleIterDataset(grain.IterDataset):
    """Reads `window_size` elements of the parent and yields them in a random order, window w's order
    seeded by (seed, w). Same contract and state as grain.experimental.WindowShuffleIterDataset."""

    def __init__(self, parent: grain.IterDataset, *, window_size: int, seed: int):
        super().__init__(parent)
        self._window_size, self._seed = int(window_size), int(seed)

    def __iter__(self) -> grain.DatasetIterator:
        return _WindowShuffleIterator(self._parent.__iter__(), self._window_size, self._seed)

    def __str__(self) -> str:
        return f"WindowShuffleIterDataset(window_size={self._window_size})"


class _WindowShuffleIterator(grain.DatasetIterator):
    """State: the parent's state before the current window, the window's index and how many of its
    elements were returned; restoring re-reads and re-shuffles that window and skips them."""

    def __init__(self, parent: grain.DatasetIterator, window_size: int, seed: int):
        super().__init__(parent)
        self._window_size, self._seed = window_size, seed
        self._window: list = []  # the current window, shuffled, consumed from the end
        self._window_index, self._returned = 0, 0
        self._window_start = None  # the parent's state before the current window
        self._exhausted = False

    def _fill(self) -> None:
        self._window_start = self._parent.get_state()
        window = []
        try:
            while len(window) < self._window_size:
                window.append(next(self._parent))
        except StopIteration:
            self._exhausted = True
        order = np.random.default_rng([self._seed, self._window_index]).permutation(len(window))
        self._window = [window[i] for i in order[::-1]]  # popped from the end: yields order[0] first
        self._returned = 0

    def __next__(self):
        if not self._window:
            if self._exhausted:
                raise StopIteration
            self._fill()
            if not self._window:
                raise StopIteration
        self._returned += 1
        element = self._window.pop()
        if not self._window:
            self._window_index += 1
        return element

    def get_state(self) -> dict:
        if not self._window:  # between windows: the next one starts at the parent's position
            return {"parent": copy.deepcopy(self._parent.get_state()), "window_index": self._window_index,
                    "returned": 0}
        return {"parent": copy.deepcopy(self._window_start), "window_index": self._window_index,
                "returned": self._returned}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._window_index, self._returned, self._exhausted, self._window = state["window_index"], 0, False, []
        if state["returned"]:
            self._fill()
            del self._window[max(0, len(self._window) - state["returned"]):]  # the ones already returned
            self._returned = state["returned"]
