"""The grain input pipeline: virtual shard -> shuffle -> repeat -> preprocess -> (split) -> pack -> batch.

Deterministic, resumable and independent of the process count: the source is split into
virtual data shards, every random choice derives from (seed, shard, element index), never from
wall clock, thread timing or the number of processes, and global batch k is the k-th block of
rows of every shard in shard order. A process materialises only the rows of its own shards, so
1, 2 or 64 processes see the same global batches; `it.get_state()` / `it.set_state()`
(JSON-serialisable, one entry per shard) resume exactly, also on another process count.
Several sources (tasks) can be mixed at fixed rates before packing: make_mixture_pipeline.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import math
import time
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from t5lite.data import packing
from t5lite.data import preprocessors as P
from t5lite.data import shuffle as shuffling
from t5lite.errors import UserError

Preprocessor = Callable[[dict, np.random.Generator], "dict | None"]


# --- Concatenate and split (a 1-to-many stage) -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitTokens:
    """Marks a 1-to-many step in a preprocessor list: concatenate the stream's `feature`
    tokens (across documents) and cut them into `length`-token chunks, as T5's
    reduce_concat_tokens + split_tokens. Steps after it see one chunk per example."""
    length: int
    feature: str = "targets"


def split_tokens(length: int, feature: str = "targets") -> SplitTokens:
    """The concatenate-and-split step for a preprocessor list (see SplitTokens)."""
    if not isinstance(length, (int, np.integer)) or length <= 0:
        raise UserError(f"split_tokens length must be a positive integer, got {length!r}")
    return SplitTokens(int(length), feature)


class ConcatSplitIterDataset(grain.IterDataset):
    """Concatenates `feature` over consecutive examples and yields {feature: chunk} of `length` tokens.

    Only the last chunk of a finite stream may be shorter. Other fields are dropped.
    """

    def __init__(self, parent: grain.IterDataset, length: int, feature: str = "targets"):
        super().__init__(parent)
        self._length, self._feature = length, feature

    def __iter__(self) -> grain.DatasetIterator:
        return _ConcatSplitIterator(self._parent.__iter__(), self._length, self._feature)

    def __str__(self) -> str:
        return f"ConcatSplitIterDataset(length={self._length}, feature={self._feature!r})"


class _ConcatSplitIterator(grain.DatasetIterator):
    """State: the parent's state before the first document not yet fully emitted, and how many
    of its tokens were already emitted; restoring re-reads that document and skips them."""

    def __init__(self, parent: grain.DatasetIterator, length: int, feature: str):
        super().__init__(parent)
        self._length, self._feature = length, feature
        self._docs = collections.deque()  # (parent state before the doc, tokens [n]) not fully emitted
        self._skip = 0  # tokens of self._docs[0] already emitted
        self._exhausted = False

    def _buffered(self) -> int:
        return sum(len(tokens) for _, tokens in self._docs) - self._skip

    def __next__(self) -> dict:
        while not self._exhausted and self._buffered() < self._length:
            state = self._parent.get_state()
            try:
                example = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            tokens = np.asarray(example[self._feature], np.int32).reshape(-1)  # [n]
            if len(tokens):
                self._docs.append((state, tokens))
        if not self._docs:
            raise StopIteration
        pieces, need = [], self._length
        while need and self._docs:
            tokens = self._docs[0][1]
            if self._skip >= len(tokens):
                # A restored position can point past the end of the document now read there (another
                # seed or source was restored into this pipeline): that document counts as emitted.
                self._docs.popleft()
                self._skip = 0
                continue
            piece = tokens[self._skip:self._skip + need]
            pieces.append(piece)
            need -= len(piece)
            self._skip += len(piece)
            if self._skip == len(tokens):
                self._docs.popleft()
                self._skip = 0
        return {self._feature: np.concatenate(pieces)}  # [<= length]

    def get_state(self) -> dict:
        parent_state = self._docs[0][0] if self._docs else self._parent.get_state()
        return {"parent": copy.deepcopy(parent_state), "skip": self._skip}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._docs.clear()
        self._skip = state["skip"]  # applies to the first document read next
        self._exhausted = False


# --- Mixing streams at random, deterministically ---------------------------------------------


class RandomMixIterDataset(grain.IterDataset):
    """Draws each next example from stream i with probability weights[i] (normalised), the draw for
    element k seeded by (seed, k), as seqio's sample_from_datasets. Random rather than grain's
    fixed interleave, so that virtual shards mixing the same streams do not all pick the same
    stream at the same step. Stops when the chosen stream runs out."""

    def __init__(self, parents: Sequence[grain.IterDataset], weights: Sequence[float], seed: int):
        super().__init__(list(parents))
        total = float(sum(weights))
        self._probabilities, self._seed = np.asarray(weights, np.float64) / total, int(seed)

    def __iter__(self) -> grain.DatasetIterator:
        return _RandomMixIterator([p.__iter__() for p in self._parents], self._probabilities, self._seed)

    def __str__(self) -> str:
        return f"RandomMixIterDataset(probabilities={self._probabilities.tolist()})"


class _RandomMixIterator(grain.DatasetIterator):
    def __init__(self, parents, probabilities, seed):
        super().__init__(parents)
        self._probabilities, self._seed, self._index = probabilities, seed, 0

    def __next__(self):
        choice = np.random.default_rng([self._seed, self._index]).choice(len(self._parents), p=self._probabilities)
        example = next(self._parents[choice])
        self._index += 1
        return example

    def get_state(self) -> dict:
        return {"index": self._index, "parents": [p.get_state() for p in self._parents]}

    def set_state(self, state: dict) -> None:
        self._index = state["index"]
        for parent, parent_state in zip(self._parents, state["parents"]):
            parent.set_state(parent_state)


# --- T5 span-corruption pretraining recipe -----------------------------------------------------


def span_corruption_preprocessors(vocab, inputs_length: int, *, noise_density: float = 0.15,
                                  mean_noise_span_length: float = 3.0,
                                  text_key: str = "text") -> list:
    """T5's pretraining steps: tokenize `text_key` -> concatenate and split into raw chunks ->
    span corruption -> EOS. With feature_lengths {'inputs': inputs_length, 'targets':
    span_corruption_lengths(inputs_length)[1]} full chunks fill the inputs exactly (512 -> 568 / 114)."""
    raw_length, _ = P.span_corruption_lengths(inputs_length, noise_density, mean_noise_span_length)

    def tokenize(example, rng):
        if text_key not in example:
            raise UserError(f"span corruption: example has no text field {text_key!r} (it has "
                            f"{sorted(example)}): set text_key to the source's text field")
        return P.tokenize({"targets": example[text_key]}, vocab, keys=("targets",),
                          copy_pretokenized=False)

    corrupt = functools.partial(P.span_corruption, vocab_size=vocab.vocab_size,
                                noise_density=noise_density,
                                mean_noise_span_length=mean_noise_span_length)
    return [tokenize, split_tokens(raw_length, "targets"), corrupt,
            lambda ex, rng: P.append_eos(ex, eos_id=vocab.eos_id)]


# --- The pipeline ------------------------------------------------------------------------------


def _chain(fns: Sequence[Preprocessor]) -> Preprocessor:
    """One random map that applies `fns` in order with the example's rng; None drops the example."""
    def apply(example, rng):
        example = dict(example)
        for fn in fns:
            example = fn(example, rng)
            if example is None:
                return None
        return example
    return apply


def _stages(preprocessors: Sequence) -> list[tuple[list, SplitTokens | None]]:
    """[(per-example fns, split before them)]: the list cut at each SplitTokens marker."""
    stages = [([], None)]
    for step in preprocessors:
        if isinstance(step, SplitTokens):
            stages.append(([], step))
        elif callable(step):
            stages[-1][0].append(step)
        else:
            raise UserError(f"preprocessor {step!r} is neither a function fn(example, rng) nor "
                            "split_tokens(...): fix the task's preprocessor list")
    return stages


def _derive_seed(seed: int, *path: int) -> int:
    """A 31-bit seed for one random stage, from the pipeline seed and the stage's place."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0] >> 1)


MAX_DATA_SHARDS = 64


def default_num_shards(batch_size: int) -> int:
    """The number of virtual data shards when none is given: gcd(batch_size, 64)."""
    return math.gcd(int(batch_size), MAX_DATA_SHARDS)


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The contiguous block of virtual shards (= of global batch rows) process `process_index` reads."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} / process_count {process_count}: need "
                        "0 <= process_index < process_count")
    if num_shards % process_count:
        raise UserError(f"{process_count} processes cannot split the {num_shards} data shards evenly; set "
                        f"train.data_shards to a multiple of {process_count} that divides the batch size")
    per = num_shards // process_count
    return range(process_index * per, (process_index + 1) * per)


def _shards(batch_size: int, num_shards: int | None, shards: Sequence[int] | None,
            process_index: int | None, process_count: int | None) -> tuple[int, list[int]]:
    """(num_shards, the shards this caller materialises), validated."""
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size <= 0:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    num_shards = default_num_shards(batch_size) if num_shards is None else num_shards
    if not isinstance(num_shards, (int, np.integer)) or num_shards <= 0 or batch_size % num_shards:
        raise UserError(f"data_shards {num_shards!r} must be a positive divisor of the global batch size "
                        f"{batch_size}: change train.data_shards")
    if shards is None:
        if process_index is None or process_count is None:
            import jax  # only when not given: keeps the data pipeline usable without initialising JAX
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        shards = process_shards(num_shards, int(process_index), int(process_count))
    shards = sorted(int(v) for v in shards)
    if not shards or len(set(shards)) != len(shards) or not all(0 <= v < num_shards for v in shards):
        raise UserError(f"shards {shards} must be distinct ids in [0, {num_shards})")
    return int(num_shards), shards


def _check(seed: int, num_epochs: int | None, feature_lengths: Mapping[str, int], decoder_only: bool) -> None:
    """Validate the pipeline arguments before any data is read."""
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if num_epochs is not None and num_epochs <= 0:
        raise UserError(f"num_epochs must be positive or None (repeat forever), got {num_epochs}")
    packing.row_lengths(feature_lengths, decoder_only)


def _examples(source, preprocessors: Sequence, *, seed: int, shuffle: bool, num_epochs: int | None,
              shard: int, num_shards: int, shuffle_window: int, num_threads: int) -> grain.IterDataset:
    """One source's preprocessed examples (before packing) for virtual shard `shard`."""
    if num_epochs is None and len(source) < num_shards:
        raise UserError(f"the source has {len(source)} examples, fewer than the {num_shards} data shards that "
                        "each need some: use more data, or a smaller train.data_shards")
    # Per-document stage (random access): the shard's slice, shuffled and repeated per epoch.
    ds = grain.MapDataset.source(source)[shard::num_shards]
    if shuffle:
        ds = shuffling.shuffle_map(ds, _derive_seed(seed, num_shards, shard))  # reshuffled each epoch
    ds = ds.repeat(num_epochs)
    stages = _stages(preprocessors)
    # The element index after repeat counts epochs too, so each epoch draws fresh randomness.
    ds = ds.random_map(_chain(stages[0][0]), seed=_derive_seed(seed, num_shards, shard, 0))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8))

    # Stages after each concatenate-and-split step: streaming; the rng follows the chunk index.
    for i, (fns, split) in enumerate(stages[1:], start=1):
        ds = ConcatSplitIterDataset(ds, split.length, split.feature)
        # Chunks of one long document would otherwise follow each other in this shard's rows. The window
        # counts chunks of the whole stream, split over the shards: every shard fills its window at once,
        # so a per-shard window of the full size would tokenize num_shards x as much before the first batch.
        window = -(-shuffle_window // num_shards)
        if shuffle and window > 1:
            ds = shuffling.WindowShuffleIterDataset(
                ds, window_size=window, seed=_derive_seed(seed, num_shards, shard, i, 1))
        if fns:
            ds = ds.random_map(_chain(fns), seed=_derive_seed(seed, num_shards, shard, i))
            ds = ds.filter(lambda ex: ex is not None)
    return ds


def _rows(ds: grain.IterDataset, feature_lengths: Mapping[str, int], *, decoder_only: bool, pack: bool,
          rows: int, pack_window: int | None) -> grain.IterDataset:
    """One shard's examples -> packed (or padded) rows -> its blocks of `rows` rows [rows, L]
    (the last block of a finite shard may be shorter)."""
    ds = packing.pack_or_pad(ds, feature_lengths, decoder_only=decoder_only, pack=pack,
                             pack_window=pack_window or max(rows, 32))
    return ds.batch(rows, drop_remainder=False)


class ShardedBatchesIterDataset(grain.IterDataset):
    """Global batch k = block k of every virtual shard, in shard order; this process yields the rows of
    `shards` only. A shard that has ended contributes padding rows; the iterator ends when all of this
    process's shards have ended (or never, with `pad_after_end`, for a caller that counts batches)."""

    def __init__(self, parents: dict[int, grain.IterDataset], num_shards: int, rows_per_shard: int, padding: dict,
                 pad_after_end: bool = False):
        super().__init__(list(parents.values()))
        self._shards, self._num_shards, self._rows, self._padding = list(parents), num_shards, rows_per_shard, padding
        self._pad_after_end = pad_after_end

    def __iter__(self) -> grain.DatasetIterator:
        return _ShardedBatchesIterator([p.__iter__() for p in self._parents], self._shards, self._num_shards,
                                       self._rows, self._padding, self._pad_after_end)

    def __str__(self) -> str:
        return f"ShardedBatchesIterDataset(shards={self._shards}, rows_per_shard={self._rows})"


class _ShardedBatchesIterator(grain.DatasetIterator):
    """State: {'num_shards', 'shards': {shard id: its iterator's state}, 'ended': [shard ids]}: per
    shard, so a checkpoint written by P processes restores on Q (each takes its shards' states)."""

    def __init__(self, parents, shards, num_shards, rows, padding, pad_after_end):
        super().__init__(parents)
        self.num_shards = num_shards
        self._by_shard = dict(zip(shards, parents))
        self._rows, self._padding, self._pad_after_end = rows, padding, pad_after_end
        self._ended: set[int] = set()

    @property
    def shards(self) -> list[int]:
        return list(self._by_shard)

    def _block(self, shard: int) -> dict:
        if shard not in self._ended:
            try:
                block = next(self._by_shard[shard])
                missing = self._rows - len(next(iter(block.values())))
                return {k: np.concatenate([v, self._padding[k][:missing]]) for k, v in block.items()} \
                    if missing else block
            except StopIteration:
                self._ended.add(shard)
        return {k: v[:self._rows] for k, v in self._padding.items()}

    def __next__(self) -> dict:
        if len(self._ended) == len(self._by_shard) and not self._pad_after_end:
            raise StopIteration
        blocks = [self._block(shard) for shard in self._by_shard]
        if len(self._ended) == len(self._by_shard) and not self._pad_after_end:
            raise StopIteration  # every shard ended in this call: nothing but padding is left
        return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}  # [rows * shards, L]

    def get_state(self) -> dict:
        return {"num_shards": self.num_shards, "shards": {str(v): it.get_state() for v, it in self._by_shard.items()},
                "ended": sorted(self._ended)}

    def set_state(self, state: dict) -> None:
        if state.get("num_shards", self.num_shards) != self.num_shards:
            raise UserError(f"the saved data position is of {state['num_shards']} data shards, this pipeline has "
                            f"{self.num_shards}; resume with the batch size and train.data_shards it was saved with")
        saved = state["shards"]
        missing = [v for v in self._by_shard if str(v) not in saved]
        if missing:
            raise UserError(f"the saved data position has no state for data shard(s) {missing}: it was saved "
                            "with other data_shards; resume with the settings it was saved with")
        for v, it in self._by_shard.items():
            it.set_state(saved[str(v)])
        self._ended = {int(v) for v in state.get("ended", ()) if int(v) in self._by_shard}


def _assemble(per_shard: dict[int, grain.IterDataset], feature_lengths, *, num_shards: int, decoder_only: bool,
              pack: bool, rows: int, pack_window: int | None, pad_after_end: bool, prefetch: int) -> grain.IterDataset:
    parents = {v: _rows(ds, feature_lengths, decoder_only=decoder_only, pack=pack, rows=rows,
                        pack_window=pack_window) for v, ds in per_shard.items()}
    padding = packing.padding_rows(rows, feature_lengths, decoder_only=decoder_only, pack=pack)
    ds = ShardedBatchesIterDataset(parents, num_shards, rows, padding, pad_after_end)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def make_dataset(source, preprocessors: Sequence = (), *, feature_lengths: Mapping[str, int],
                 batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 pack: bool = True, decoder_only: bool = False, process_index: int | None = None,
                 process_count: int | None = None, num_shards: int | None = None,
                 shards: Sequence[int] | None = None, pad_after_end: bool = False,
                 pack_window: int | None = None, shuffle_window: int = 128, num_threads: int = 0,
                 prefetch: int = 0) -> grain.IterDataset:
    """The pipeline as a grain IterDataset of batches; see make_pipeline."""
    num_shards, shards = _shards(batch_size, num_shards, shards, process_index, process_count)
    _check(seed, num_epochs, feature_lengths, decoder_only)
    per_shard = {v: _examples(source, preprocessors, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard=v,
                              num_shards=num_shards, shuffle_window=shuffle_window, num_threads=num_threads)
                 for v in shards}
    return _assemble(per_shard, feature_lengths, num_shards=num_shards, decoder_only=decoder_only, pack=pack,
                     rows=batch_size // num_shards, pack_window=pack_window, pad_after_end=pad_after_end,
                     prefetch=prefetch)


_MIXTURE_TAG = 0x6D6978  # "mix": the seeds of mixture streams derive from (seed, tag, stream index)


def make_mixture_dataset(streams: Sequence[tuple[Any, Sequence, float]], *,
                         feature_lengths: Mapping[str, int], batch_size: int, seed: int,
                         shuffle: bool = True, num_epochs: int | None = None, pack: bool = True,
                         decoder_only: bool = False, process_index: int | None = None,
                         process_count: int | None = None, num_shards: int | None = None,
                         shards: Sequence[int] | None = None, pad_after_end: bool = False,
                         pack_window: int | None = None, shuffle_window: int = 128, num_threads: int = 0,
                         prefetch: int = 0) -> grain.IterDataset:
    """Several (source, preprocessors, weight) streams mixed BEFORE packing and batching.

    Each stream is preprocessed as in make_dataset with its own seed; within every virtual shard
    the next example comes from stream i with probability weight_i / sum(weights), each draw
    seeded by (seed, shard, position), so the mixture resumes exactly (RandomMixIterDataset).
    With num_epochs set, a shard stops when a stream it draws from has run out.
    """
    if not streams:
        raise UserError("a mixture needs at least one (source, preprocessors, weight) stream")
    weights = [float(weight) for _, _, weight in streams]
    if any(not np.isfinite(w) or w <= 0 for w in weights):
        raise UserError(f"mixture weights must be positive numbers, got {weights}: fix the rates")
    num_shards, shards = _shards(batch_size, num_shards, shards, process_index, process_count)
    _check(seed, num_epochs, feature_lengths, decoder_only)
    per_shard = {}
    for v in shards:
        parts = [_examples(source, preprocessors, seed=_derive_seed(seed, _MIXTURE_TAG, k), shuffle=shuffle,
                           num_epochs=num_epochs, shard=v, num_shards=num_shards, shuffle_window=shuffle_window,
                           num_threads=num_threads)
                 for k, (source, preprocessors, _) in enumerate(streams)]
        per_shard[v] = parts[0] if len(parts) == 1 else RandomMixIterDataset(
            parts, weights, _derive_seed(seed, _MIXTURE_TAG, num_shards, v))
    return _assemble(per_shard, feature_lengths, num_shards=num_shards, decoder_only=decoder_only, pack=pack,
                     rows=batch_size // num_shards, pack_window=pack_window, pad_after_end=pad_after_end,
                     prefetch=prefetch)


def make_pipeline(source, preprocessors: Sequence = (), *, feature_lengths: Mapping[str, int],
                  batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                  pack: bool = True, decoder_only: bool = False, process_index: int | None = None,
                  process_count: int | None = None, **options) -> grain.DatasetIterator:
    """A resumable iterator of this process's rows of every global batch: dicts of int32 [rows, L].

    The global batch order is a function of (seed, data shards) only, never of the process count:
    the data is split into `num_shards` virtual shards (default gcd(batch_size, 64)), each shuffled,
    preprocessed and packed on its own, and global batch k is block k of every shard in shard order
    (batch_size / num_shards rows each). A process reads only its shards (`shards`, or its block
    from process_index / process_count, which must divide num_shards), so it does 1/P of the work.

    source: random access (`len`, `[i]` -> dict), e.g. a list of dicts or a TFDS data source.
    preprocessors: fn(example, rng) -> example | None (None drops it), and split_tokens(...) steps.
    Options: num_shards, shards, pad_after_end (a finite stream yields padding rows forever after
    its end), pack_window (rows first-fit packs at once per shard, default max(rows, 32)),
    shuffle_window (chunks of the whole stream shuffled together after a split, 128; each shard
    shuffles its 1/num_shards share), num_threads (reader threads per shard, 0),
    prefetch (batches prepared ahead in a thread, 0).
    """
    return iter(make_dataset(source, preprocessors, feature_lengths=feature_lengths,
                             batch_size=batch_size, seed=seed, shuffle=shuffle,
                             num_epochs=num_epochs, pack=pack, decoder_only=decoder_only,
                             process_index=process_index, process_count=process_count, **options))


def make_mixture_pipeline(streams: Sequence[tuple[Any, Sequence, float]], *,
                          feature_lengths: Mapping[str, int], batch_size: int, seed: int,
                          **options) -> grain.DatasetIterator:
    """A resumable iterator over a mixture of streams; see make_mixture_dataset and make_pipeline."""
    return iter(make_mixture_dataset(streams, feature_lengths=feature_lengths,
                                     batch_size=batch_size, seed=seed, **options))


# --- State and throughput ----------------------------------------------------------------------


def iterator_state(it: grain.DatasetIterator) -> bytes:
    """The iterator's position as JSON bytes (store it with the checkpoint)."""
    return json.dumps(it.get_state(), sort_keys=True).encode("utf-8")


def restore_iterator(it: grain.DatasetIterator, state: bytes | str | Mapping[str, Any]) -> None:
    """Move a freshly built iterator (same arguments) to a position saved by iterator_state."""
    if isinstance(state, (bytes, str)):
        state = json.loads(state)
    try:
        it.set_state(dict(state))
    except (KeyError, TypeError, IndexError) as e:
        raise UserError(f"the saved data-iterator state does not fit this pipeline ({e!r}): rebuild "
                        "the pipeline with the arguments it was saved with") from None


def benchmark_pipeline(it: grain.DatasetIterator, num_batches: int = 128) -> dict[str, float]:
    """Throughput of `it` over its first `num_batches` batches, the first one included (not a test).

    Packing works a window of rows ahead (`pack_window`, 32 batches of one row per shard by default),
    so the first batch pays for the next 31: timing after a warm-up batch would count prepared batches
    for free. Counting from the first batch over several windows measures the work per batch.
    """
    tokens, start = 0, time.perf_counter()
    for i in range(num_batches):
        batch = next(it)
        if i == 0:
            first_batch_s = time.perf_counter() - start
        tokens += int(np.count_nonzero(batch["decoder_target_tokens"]))
        if "encoder_input_tokens" in batch:
            tokens += int(np.count_nonzero(batch["encoder_input_tokens"]))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "first_batch_s": first_batch_s, "batches_per_s": num_batches / seconds,
            "tokens_per_s": tokens / seconds}
