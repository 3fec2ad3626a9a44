"""BART-style text infilling (P.text_infilling, task bible_infill_en_es) and the Bible-section
classification task (bible_section): checked against what each must be by construction."""

import collections

import numpy as np
import pytest

from t5lite.data import preprocessors as P
from t5lite.data import tasks
from t5lite.errors import UserError

VOCAB_SIZE = 8192


def test_infilling_targets_are_the_whole_text_and_inputs_are_span_corruptions_inputs():
    tokens = np.arange(3, 203, dtype=np.int32)  # [200] no token is a sentinel
    out = P.text_infilling({"targets": tokens}, np.random.default_rng(5), vocab_size=VOCAB_SIZE)
    np.testing.assert_array_equal(out["targets"], tokens)
    same = P.span_corruption({"targets": tokens}, np.random.default_rng(5), vocab_size=VOCAB_SIZE,
                             noise_density=0.3, cap_spans=True)
    np.testing.assert_array_equal(out["inputs"], same["inputs"])
    sentinels = out["inputs"] >= VOCAB_SIZE - P.NUM_SENTINELS
    kept = out["inputs"][~sentinels]
    assert 0 < sentinels.sum() and len(kept) + len(same["targets"]) - sentinels.sum() == len(tokens)
    assert np.all(np.diff(kept) > 0) and set(kept) < set(tokens)  # the kept tokens, in order
    assert abs(1 - len(kept) / len(tokens) - 0.3) < 0.02           # 30 % of the tokens masked


def test_infilling_noise_rate_over_many_chunks():
    rng = np.random.default_rng(0)
    masked = [P.text_infilling({"targets": np.arange(3, 98)}, rng, vocab_size=VOCAB_SIZE) for _ in range(300)]
    rate = np.mean([1 - np.sum(m["inputs"] < VOCAB_SIZE - P.NUM_SENTINELS) / 95 for m in masked])
    assert abs(rate - 0.3) < 0.01


def test_infill_task_rows_end_with_eos_and_fit_the_lengths():
    vocab = tasks.default_vocabulary()
    rows = list(tasks.get("bible_infill_en_es").pipeline(
        "validation", feature_lengths={"inputs": 48, "targets": 48}, batch_size=1, shuffle=False, num_epochs=1,
        pack=False, process_index=0, process_count=1))[:20]
    for row in rows:
        targets = row["decoder_target_tokens"][0]
        targets = targets[targets > 0]
        inputs = row["encoder_input_tokens"][0]
        inputs = inputs[inputs > 0]
        assert len(targets) == 48 and targets[-1] == vocab.eos_id       # 47 text tokens + EOS: nothing cut
        assert inputs[-1] == vocab.eos_id and len(inputs) < len(targets)
        kept = inputs[:-1][inputs[:-1] < VOCAB_SIZE - P.NUM_SENTINELS]
        it = iter(targets)
        assert all(any(t == k for t in it) for k in kept)              # inputs' text is a subsequence


def test_infilling_needs_room_for_the_eos():
    with pytest.raises(UserError, match="targets >= 3"):
        tasks.get("bible_infill_en_es").pipeline("validation", feature_lengths={"inputs": 1, "targets": 2},
                                                 batch_size=1, process_index=0, process_count=1)


def test_section_labels_cover_every_book_of_the_corpus():
    train = tasks.get("bible_section").source("train")
    books = list(dict.fromkeys(r["book"] for r in train.__getitems__(list(range(len(train))))))
    assert sorted(books) == sorted(tasks.SECTION_OF_BOOK) and len(books) == 66  # every book has a section
    source = tasks.get("bible_section").source("validation")
    counts = collections.Counter(tasks.SECTION_OF_BOOK[source[i]["book"]] for i in range(len(source)))
    assert set(counts) == set(tasks.BIBLE_SECTIONS)
    example = tasks.get("bible_section").preprocessors_fn(tasks.default_vocabulary(), None)[0](source[0], None)
    assert example["inputs"] == "which part of the Bible: " + source[0]["en_web"]
    assert example["targets"] == tasks.SECTION_OF_BOOK[source[0]["book"]]
