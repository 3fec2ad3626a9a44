"""The grain input pipeline: shard -> shuffle -> repeat -> preprocess -> (split) -> pack -> batch.

Deterministic and resumable: every random choice derives from (seed, process_index, element
index), never from wall clock or thread timing, so the same seed and process count give the
same batches, and `it.get_state()` / `it.set_state()` (JSON-serialisable) resume exactly.
Each process reads a disjoint slice of the source and yields its share of the global batch.
Several sources (tasks) can be mixed at fixed rates before packing: make_mixture_pipeline.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import time
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from t5lite.data import packing
from t5lite.data import preprocessors as P
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


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), defaulting to this JAX process."""
    if process_index is None or process_count is None:
        import jax  # only when not given: keeps the data pipeline usable without initialising JAX
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} / process_count {process_count}: need "
                        "0 <= process_index < process_count")
    return int(process_index), int(process_count)


def _check(batch_size: int, seed: int, num_epochs: int | None, feature_lengths: Mapping[str, int],
           decoder_only: bool, process_index: int | None, process_count: int | None
           ) -> tuple[int, int, int]:
    """Validate the pipeline arguments before any data is read; (process_index, count, local batch)."""
    process_index, process_count = _process(process_index, process_count)
    if batch_size <= 0 or batch_size % process_count:
        raise UserError(f"global batch_size {batch_size} must be a positive multiple of the "
                        f"process count {process_count}: change the batch size")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if num_epochs is not None and num_epochs <= 0:
        raise UserError(f"num_epochs must be positive or None (repeat forever), got {num_epochs}")
    packing.row_lengths(feature_lengths, decoder_only)
    return process_index, process_count, batch_size // process_count


def _examples(source, preprocessors: Sequence, *, seed: int, shuffle: bool, num_epochs: int | None,
              process_index: int, process_count: int, local_batch: int, shuffle_window: int,
              num_threads: int) -> grain.IterDataset:
    """One source's preprocessed examples (before packing) for this process's shard."""
    if len(source) < process_count:
        raise UserError(f"the source has {len(source)} examples, fewer than the {process_count} "
                        "processes that each need a disjoint share: use more data or fewer hosts")
    # Per-document stage (random access): shard by index, then shuffle and repeat per epoch.
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=int(seed))  # reshuffled each epoch: seed + epoch
    ds = ds.repeat(num_epochs)
    stages = _stages(preprocessors)
    # The element index after repeat counts epochs too, so each epoch draws fresh randomness.
    ds = ds.random_map(_chain(stages[0][0]), seed=_derive_seed(seed, process_index, 0))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * local_batch))

    # Stages after each concatenate-and-split step: streaming; the rng follows the chunk index.
    for i, (fns, split) in enumerate(stages[1:], start=1):
        ds = ConcatSplitIterDataset(ds, split.length, split.feature)
        if shuffle and shuffle_window > 1:  # chunks of one document otherwise land side by side
            ds = grain.experimental.WindowShuffleIterDataset(
                ds, window_size=shuffle_window, seed=_derive_seed(seed, process_index, i, 1))
        if fns:
            ds = ds.random_map(_chain(fns), seed=_derive_seed(seed, process_index, i))
            ds = ds.filter(lambda ex: ex is not None)
    return ds


def _batches(ds: grain.IterDataset, feature_lengths: Mapping[str, int], *, decoder_only: bool,
             pack: bool, local_batch: int, pack_window: int | None, prefetch: int) -> grain.IterDataset:
    """Examples -> packed (or padded) rows -> batches of int32 [local_batch, L]."""
    ds = packing.pack_or_pad(ds, feature_lengths, decoder_only=decoder_only, pack=pack,
                             pack_window=pack_window or max(local_batch, 16))
    ds = ds.batch(local_batch, drop_remainder=True)  # dict of int32 [local_batch, L]
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def make_dataset(source, preprocessors: Sequence = (), *, feature_lengths: Mapping[str, int],
                 batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 pack: bool = True, decoder_only: bool = False, process_index: int | None = None,
                 process_count: int | None = None, pack_window: int | None = None,
                 shuffle_window: int = 128, num_threads: int = 2,
                 prefetch: int = 0) -> grain.IterDataset:
    """The pipeline as a grain IterDataset of batches; see make_pipeline."""
    process_index, process_count, local_batch = _check(
        batch_size, seed, num_epochs, feature_lengths, decoder_only, process_index, process_count)
    ds = _examples(source, preprocessors, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                   process_index=process_index, process_count=process_count,
                   local_batch=local_batch, shuffle_window=shuffle_window, num_threads=num_threads)
    return _batches(ds, feature_lengths, decoder_only=decoder_only, pack=pack,
                    local_batch=local_batch, pack_window=pack_window, prefetch=prefetch)


_MIXTURE_TAG = 0x6D6978  # "mix": the seeds of mixture streams derive from (seed, tag, stream index)


def make_mixture_dataset(streams: Sequence[tuple[Any, Sequence, float]], *,
                         feature_lengths: Mapping[str, int], batch_size: int, seed: int,
                         shuffle: bool = True, num_epochs: int | None = None, pack: bool = True,
                         decoder_only: bool = False, process_index: int | None = None,
                         process_count: int | None = None, pack_window: int | None = None,
                         shuffle_window: int = 128, num_threads: int = 2,
                         prefetch: int = 0) -> grain.IterDataset:
    """Several (source, preprocessors, weight) streams mixed BEFORE packing and batching.

    Each stream is preprocessed as in make_dataset with its own seed; grain interleaves the
    examples deterministically in the ratio of the weights (not by random draws), so the
    mixture resumes exactly. With num_epochs set it stops when the first stream runs out.
    """
    if not streams:
        raise UserError("a mixture needs at least one (source, preprocessors, weight) stream")
    weights = [float(weight) for _, _, weight in streams]
    if any(not np.isfinite(w) or w <= 0 for w in weights):
        raise UserError(f"mixture weights must be positive numbers, got {weights}: fix the rates")
    process_index, process_count, local_batch = _check(
        batch_size, seed, num_epochs, feature_lengths, decoder_only, process_index, process_count)
    parts = [_examples(source, preprocessors, seed=_derive_seed(seed, _MIXTURE_TAG, k),
                       shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                       process_count=process_count, local_batch=local_batch,
                       shuffle_window=shuffle_window, num_threads=num_threads)
             for k, (source, preprocessors, _) in enumerate(streams)]
    ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, weights)
    return _batches(ds, feature_lengths, decoder_only=decoder_only, pack=pack,
                    local_batch=local_batch, pack_window=pack_window, prefetch=prefetch)


def make_pipeline(source, preprocessors: Sequence = (), *, feature_lengths: Mapping[str, int],
                  batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                  pack: bool = True, decoder_only: bool = False, process_index: int | None = None,
                  process_count: int | None = None, **options) -> grain.DatasetIterator:
    """A resumable iterator of this process's batches: dicts of int32 [batch_size // process_count, L].

    source: random access (`len`, `[i]` -> dict), e.g. a list of dicts or a TFDS data source.
    preprocessors: fn(example, rng) -> example | None (None drops it), and split_tokens(...) steps.
    Options: pack_window (rows first-fit packs at once, default max(local batch, 16)),
    shuffle_window (chunk shuffle after a split, 128), num_threads (2), prefetch (batches, 0).
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


def benchmark_pipeline(it: grain.DatasetIterator, num_batches: int = 50) -> dict[str, float]:
    """Throughput of `it` over `num_batches` batches after one warm-up batch (not a test)."""
    next(it)
    tokens, start = 0, time.perf_counter()
    for _ in range(num_batches):
        batch = next(it)
        tokens += int(np.count_nonzero(batch["decoder_target_tokens"]))
        if "encoder_input_tokens" in batch:
            tokens += int(np.count_nonzero(batch["encoder_input_tokens"]))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "batches_per_s": num_batches / seconds, "tokens_per_s": tokens / seconds}
