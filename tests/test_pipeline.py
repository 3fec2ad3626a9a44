"""The grain pipeline: determinism, exact resume, per-process shards, epochs, span corruption."""

import json

import grain
import numpy as np
import pytest

from t5lite.data import pipeline as pl
from t5lite.data.preprocessors import span_corruption_lengths
from t5lite.data.vocab import Vocabulary, train_vocabulary
from t5lite.errors import UserError
from tests.test_preprocessors import deinterleave
from tests.test_vocab import sentences

LENGTHS = {"inputs": 16, "targets": 8}


def docs(n, seed=0):
    """Examples whose first target token is 3 + their index, so every row names its source."""
    rng = np.random.default_rng(seed)
    return [{"inputs": rng.integers(3, 500, rng.integers(1, 12)).astype(np.int32),
             "targets": np.r_[i + 3, rng.integers(3, 500, rng.integers(0, 6))].astype(np.int32)}
            for i in range(n)]


def random_crop(example, rng):
    """A random preprocessor: keep a random-length prefix of the inputs and tag it with a draw."""
    keep = int(rng.integers(1, len(example["inputs"]) + 1))
    return {**example, "inputs": np.r_[example["inputs"][:keep], rng.integers(600, 700)]}


def build(source, preprocessors=(random_crop,), **kw):
    args = dict(feature_lengths=LENGTHS, batch_size=4, seed=0, process_index=0, process_count=1)
    return pl.make_pipeline(source, list(preprocessors), **{**args, **kw})


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def ids(batches):
    """Source indices of the examples in unpacked batches, in order (padding rows skipped)."""
    return [int(t) - 3 for b in batches for t in b["decoder_target_tokens"][:, 0] if t]


# --- Determinism and resume ---------------------------------------------------------------------


def test_same_seed_same_batches_other_seed_other_batches():
    source = docs(40)
    a, b = take(build(source), 8), take(build(source), 8)
    assert_same(a, b)
    for key, v in a[0].items():
        assert v.dtype == np.int32 and v.shape == (4, LENGTHS["inputs" if "encoder" in key else "targets"])
    c = take(build(source, seed=1), 8)
    assert any(not np.array_equal(x["encoder_input_tokens"], y["encoder_input_tokens"])
               for x, y in zip(a, c))


CONFIGS = {
    # 10 examples, 4 a batch (4 data shards of 3, 3, 2, 2 examples), unpacked, 4 epochs.
    "unpacked_epochs": dict(source=docs(10), pack=False, num_epochs=4),
    "packed_forever_prefetch": dict(source=docs(30), num_epochs=None, prefetch=2, pack_window=3),
    "prefix_lm": dict(source=docs(25), decoder_only=True, num_epochs=None),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_restore_after_k_batches_continues_exactly(name):
    kw = dict(CONFIGS[name])
    source = kw.pop("source")
    full = take(build(source, **kw), 10)
    for k in (0, 2, 3, 5, 7):
        it = build(source, **kw)
        take(it, k)
        state = pl.iterator_state(it)  # JSON bytes, as stored with a checkpoint
        resumed = build(source, **kw)
        pl.restore_iterator(resumed, state)
        assert_same(take(resumed, 10 - k), full[k:])
        # The plain grain API with a JSON round trip does the same.
        again = build(source, **kw)
        again.set_state(json.loads(json.dumps(it.get_state())))
        assert_same(take(again, 10 - k), full[k:])
    if kw.get("num_epochs"):  # 40 examples in 4 epochs: shards 0 and 1 hold 12 rows, 2 and 3 hold 8
        batches = list(build(source, **kw))
        assert len(batches) == 12  # the last 4 batches are half padding, then the end
        assert sorted(ids(batches)) == sorted(list(range(10)) * 4)
        assert sum(not r.any() for b in batches for r in b["decoder_target_tokens"]) == 8  # padding rows


def test_epochs_cover_the_data_reshuffled_with_fresh_randomness():
    source = docs(12)
    batches = list(build(source, pack=False, num_epochs=3, batch_size=1))
    order = ids(batches)
    epochs = [order[i * 12:(i + 1) * 12] for i in range(3)]
    assert len(order) == 36 and all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    # random_crop's draw (the last input token) is per (seed, epoch, index), not per document.
    draws = {}
    for i, b in zip(order, batches):
        row = b["encoder_input_tokens"][0]
        draws.setdefault(i, []).append(int(row[np.count_nonzero(row) - 1]))
    assert all(600 <= d < 700 for ds in draws.values() for d in ds)
    assert sum(len(set(ds)) > 1 for ds in draws.values()) >= 9
    assert ids(list(build(source, pack=False, num_epochs=1, batch_size=1, shuffle=False))) == list(range(12))


def test_preprocessor_returning_none_drops_the_example():
    def keep_even(example, rng):
        return example if (example["targets"][0] - 3) % 2 == 0 else None

    got = ids(list(build(docs(20), [keep_even], pack=False, num_epochs=1, batch_size=2)))
    assert sorted(got) == list(range(0, 20, 2))


# --- Processes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["unpacked_epochs", "packed_forever_prefetch", "prefix_lm"])
def test_every_process_count_gives_the_same_global_batches(config):
    """1, 2 and 4 processes (simulated): each reads only its rows, and together they give the
    1-process batches; each process's shards, and so its examples, are its own."""
    kw = dict(CONFIGS[config])
    source = kw.pop("source")
    reference = take(build(source, **kw), 8)
    for count in (2, 4):
        per_process = [take(build(source, process_index=i, process_count=count, **kw), 8) for i in range(count)]
        for step, want in enumerate(reference):
            rows = [batches[step] for batches in per_process]
            assert all(len(r["decoder_target_tokens"]) == 4 // count for r in rows)
            got = {k: np.concatenate([r[k] for r in rows]) for k in want}
            assert_same([got], [want])


def test_processes_read_disjoint_shards_that_cover_the_data():
    source = docs(40)
    seen = []
    for index in (0, 1):
        batches = list(build(source, pack=False, num_epochs=1, batch_size=4, process_index=index, process_count=2))
        assert len(batches) == 10 and all(b["encoder_input_tokens"].shape == (2, 16) for b in batches)
        seen.append(ids(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(40))
    assert sorted(seen[0]) == [i for i in range(40) if i % 4 < 2]  # 4 shards by index: process 0 has 0 and 1


def test_process_defaults_come_from_jax_and_bad_arguments_are_user_errors():
    it = pl.make_pipeline(docs(8), [], feature_lengths=LENGTHS, batch_size=2, seed=0, pack=False)
    assert next(it)["encoder_input_tokens"].shape == (2, 16)  # one JAX process: the whole batch
    with pytest.raises(UserError, match="2 processes cannot split the 1 data shards"):
        build(docs(8), batch_size=3, process_count=2)
    with pytest.raises(UserError, match="divisor of the global batch size 4"):
        build(docs(8), num_shards=3)
    with pytest.raises(UserError, match="seed"):
        build(docs(8), seed=-1)
    with pytest.raises(UserError, match="process_index"):
        build(docs(8), process_index=2, process_count=2)
    with pytest.raises(UserError, match="no 'targets' length"):
        build(docs(8), feature_lengths={"inputs": 4})
    with pytest.raises(UserError, match="neither a function"):
        build(docs(8), ["tokenize"])
    with pytest.raises(UserError, match="does not fit this pipeline"):
        pl.restore_iterator(build(docs(8)), b'{"wrong": 1}')


# --- Concatenate and split, span corruption ----------------------------------------------------


def test_concat_split_chunks_the_stream_and_resumes_anywhere():
    rng = np.random.default_rng(0)
    documents = [{"targets": rng.integers(3, 100, n)} for n in [0, 5, 17, 3, 0, 40, 1, 9, 22]]
    ds = pl.ConcatSplitIterDataset(grain.MapDataset.source(documents).to_iter_dataset(), 8)
    chunks = [c["targets"] for c in ds]
    assert [len(c) for c in chunks[:-1]] == [8] * (len(chunks) - 1) and 0 < len(chunks[-1]) <= 8
    np.testing.assert_array_equal(np.concatenate(chunks),
                                  np.concatenate([d["targets"] for d in documents]))
    for k in range(len(chunks) + 1):
        it = iter(ds)
        for _ in range(k):
            next(it)
        resumed = iter(ds)
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        rest = list(resumed)
        assert len(rest) == len(chunks) - k
        for a, b in zip(rest, chunks[k:]):
            np.testing.assert_array_equal(a["targets"], b)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    corpus.write_text("\n".join(sentences(400, seed=0)) + "\n", encoding="utf-8")
    return Vocabulary(train_vocabulary(str(corpus), 300, tmp_path_factory.mktemp("vocab")))


def test_span_corruption_through_the_pipeline_reassembles_the_text(vocab):
    inputs_length = 64
    raw_length, targets_length = span_corruption_lengths(inputs_length)
    texts = [" ".join(sentences(8, seed=i)) for i in range(30)]
    source = [{"text": t} for t in texts]
    steps = pl.span_corruption_preprocessors(vocab, inputs_length)
    lengths = {"inputs": inputs_length, "targets": targets_length}
    batches = list(pl.make_pipeline(source, steps, feature_lengths=lengths, batch_size=2, seed=3,
                                    shuffle=False, num_epochs=1, pack=False, num_shards=1,
                                    process_index=0, process_count=1))  # one shard: one token stream
    stream = np.concatenate([vocab.encode(t) for t in texts])
    num_chunks = -(-len(stream) // raw_length)  # the last one is short
    assert len(batches) == num_chunks // 2 and num_chunks % 2 == 0  # (else one chunk is dropped)
    rebuilt = []
    for b in batches:
        assert b["encoder_input_tokens"].shape == (2, inputs_length)
        assert b["decoder_target_tokens"].shape == (2, targets_length)
        for inputs, targets in zip(b["encoder_input_tokens"], b["decoder_target_tokens"]):
            m, n = np.count_nonzero(inputs), np.count_nonzero(targets)
            assert inputs[m - 1] == vocab.eos_id and targets[n - 1] == vocab.eos_id
            assert (inputs[:m] != 0).all() and (targets[:n] != 0).all()
            rebuilt.append(deinterleave(inputs[:m - 1], targets[:n - 1], vocab.vocab_size))
    # Every full chunk fills the inputs exactly (no padding), as span_corruption_lengths promises.
    assert all(np.count_nonzero(i) == inputs_length for b in batches[:-1] for i in b["encoder_input_tokens"])
    assert [len(c) for c in rebuilt[:-1]] == [raw_length] * (num_chunks - 1)
    np.testing.assert_array_equal(np.concatenate(rebuilt), stream)


def test_span_corruption_shuffled_packed_pipeline_resumes_exactly(vocab):
    source = [{"text": " ".join(sentences(6, seed=i))} for i in range(3)]
    raw_length, targets_length = span_corruption_lengths(32)
    lengths = {"inputs": 32, "targets": targets_length}
    rows_per_epoch = sum(len(vocab.encode(d["text"])) for d in source) / raw_length
    assert rows_per_epoch < 2 * 8  # so 14 batches of 2 cross an epoch boundary
    kw = dict(feature_lengths=lengths, batch_size=2, seed=5, shuffle_window=4,
              process_index=0, process_count=1)

    def build_sc():
        return pl.make_pipeline(source, pl.span_corruption_preprocessors(vocab, 32), **kw)

    full = take(build_sc(), 14)
    assert full[0]["encoder_segment_ids"].shape == (2, 32)
    for k in (1, 5, 8, 11):
        it = build_sc()
        take(it, k)
        resumed = build_sc()
        pl.restore_iterator(resumed, pl.iterator_state(it))
        assert_same(take(resumed, 14 - k), full[k:])


def test_packing_is_as_dense_with_many_data_shards_as_with_one():
    """Each shard packs on its own; its rows must stay as full as one stream's (not 2 % emptier)."""
    source = docs(400)

    def tokens_per_row(num_shards):
        batches = take(build(source, batch_size=16, num_shards=num_shards), 20)
        return np.mean([np.count_nonzero(b[k]) / len(b[k]) for b in batches
                        for k in ("encoder_input_tokens", "decoder_target_tokens")])

    one, sixteen = tokens_per_row(1), tokens_per_row(16)
    assert sixteen >= 0.98 * one, (one, sixteen)
