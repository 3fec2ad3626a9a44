"""Vocabulary: train a tiny T5-layout model, check its layout, round trips and user errors."""

import gzip
import io
import os
import pickle
import random
import re

import numpy as np
import pytest
import sentencepiece as spm

from t5lite.data.vocab import Vocabulary, train_vocabulary
from t5lite.errors import UserError

SIZE = 300

EN = ("the a one my your old new small big red green blue cat dog house river city man woman child "
      "teacher book letter window garden runs walks sees writes reads finds opens carries quickly "
      "slowly today yesterday near under over behind and but with without because").split()
ES = ("el la un una mi tu viejo nuevo pequeño grande rojo verde azul gato perro casa río ciudad "
      "hombre mujer niño maestra libro carta ventana jardín corre camina ve escribe lee encuentra "
      "abre lleva rápidamente despacio hoy ayer cerca bajo sobre detrás y pero con sin porque").split()


def sentences(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = EN if i % 2 else ES
        text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        out.append(f"{text.capitalize()} {rng.randint(0, 5000)}{rng.choice('.?!,;')}")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(sentences(400, seed=0)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("vocab")
    return train_vocabulary(corpus, SIZE, out_dir), str(out_dir)


@pytest.fixture(scope="module")
def vocab(trained):
    return Vocabulary(trained[0])


def plain_model(corpus, **layout):
    """A model trained with sentencepiece directly (no sentinels)."""
    out = io.BytesIO()
    lines = open(corpus, encoding="utf-8").read().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=150,
                                   minloglevel=2, **layout)
    return out.getvalue()


def test_layout(vocab, trained):
    assert vocab.vocab_size == SIZE and vocab.num_sentinels == 100
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert [vocab.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    for i in range(100):
        assert vocab.sentinel_id(i) == SIZE - 1 - i
        assert vocab.id_to_piece(SIZE - 1 - i) == f"<extra_id_{i}>"
    assert not any(vocab.id_to_piece(i).startswith("<extra_id") for i in range(SIZE - 100))
    with pytest.raises(ValueError):
        vocab.sentinel_id(100)
    out_dir = trained[1]
    assert sorted(os.listdir(out_dir)) == ["spiece.model", "spiece.vocab"]  # no temp files left
    rows = open(os.path.join(out_dir, "spiece.vocab"), encoding="utf-8").read().splitlines()
    assert [r.split("\t")[0] for r in rows] == [vocab.id_to_piece(i) for i in range(SIZE)]


def test_encode_decode_round_trip(vocab):
    texts = sentences(50, seed=1)  # new combinations of the same words
    for text in texts:
        ids = vocab.encode(text)
        assert all(3 <= i < SIZE - 100 for i in ids), text  # no pad/EOS/sentinel inside text
        assert vocab.decode(ids) == text
    assert vocab.encode_batch(texts) == [vocab.encode(t) for t in texts]
    assert vocab.decode_batch([np.array(vocab.encode(t)) for t in texts]) == texts
    assert vocab.encode(texts[0].encode("utf-8")) == vocab.encode(texts[0])


def test_sentinels_encode_and_decode(vocab):
    assert vocab.encode("<extra_id_0>")[-1] == SIZE - 1
    text = "El gato<extra_id_3> corre hoy <extra_id_99>."
    ids = vocab.encode(text)
    assert vocab.sentinel_id(3) in ids and vocab.sentinel_id(99) in ids
    assert vocab.decode(ids) == text
    # Span-corruption style ids: sentinel, span, sentinel, span.
    assert vocab.decode([vocab.sentinel_id(0)] + vocab.encode("gato") + [vocab.sentinel_id(1)]) \
        == "<extra_id_0> gato<extra_id_1>"


def test_decode_stops_at_eos_and_drops_pad(vocab):
    ids = vocab.encode("Un perro verde 42.")
    assert vocab.decode([0, 0] + ids + [1] + vocab.encode("never shown") + [0]) == "Un perro verde 42."
    assert vocab.decode(np.array(ids + [0, 0, 0], dtype=np.int32)) == "Un perro verde 42."
    assert vocab.decode([]) == "" and vocab.decode([1] + ids) == ""
    # Ids past the model (padded logit rows, e.g. 32128 vs 32100) decode as UNK.
    assert vocab.decode(ids + [SIZE + 5]) == vocab.decode(ids + [2]) != vocab.decode(ids)


def test_from_bytes_and_pickle(vocab):
    text = "My old teacher reads a letter 17!"
    copy = Vocabulary.from_bytes(vocab.serialized_model)
    assert copy.vocab_size == SIZE and copy.encode(text) == vocab.encode(text)
    assert pickle.loads(pickle.dumps(vocab)).encode(text) == vocab.encode(text)


def test_gz_input_and_replacing_an_existing_model(corpus, tmp_path):
    gz = tmp_path / "text.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(open(corpus, encoding="utf-8").read())
    out = tmp_path / "v"
    first = Vocabulary(train_vocabulary([str(gz)], 250, out))
    assert first.vocab_size == 250 and first.sentinel_id(0) == 249
    assert Vocabulary(train_vocabulary([str(gz)], SIZE, out)).vocab_size == SIZE
    assert sorted(os.listdir(out)) == ["spiece.model", "spiece.vocab"]


def test_model_without_sentinels_is_refused(corpus, tmp_path):
    path = tmp_path / "plain.model"
    path.write_bytes(plain_model(corpus, pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    with pytest.raises(UserError, match="t5lite vocab train") as err:
        Vocabulary(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    loose = Vocabulary(path, require_sentinels=False)
    assert loose.vocab_size == 150
    # T5's original spiece.model has no sentinels either: extra_ids=100 appends them on top.
    extended = Vocabulary(path, extra_ids=100)
    assert extended.vocab_size == 250 and extended.encode("<extra_id_0>")[-1] == 249
    assert Vocabulary.from_bytes(extended.serialized_model).sentinel_id(99) == 150


def test_model_with_sentencepiece_default_ids_is_refused(corpus):
    default_layout = plain_model(corpus)  # unk 0, bos 1, eos 2, no pad
    with pytest.raises(UserError, match="pad 0 and EOS 1"):
        Vocabulary.from_bytes(default_layout, extra_ids=100)


def test_missing_or_broken_files(tmp_path, corpus):
    with pytest.raises(UserError, match="does not exist"):
        Vocabulary(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a loadable SentencePiece model"):
        Vocabulary(tmp_path / "junk.model")
    with pytest.raises(UserError, match="missing.txt does not exist"):
        train_vocabulary([corpus, str(tmp_path / "missing.txt")], SIZE, tmp_path / "out")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="no text"):
        train_vocabulary(str(tmp_path / "empty.txt"), SIZE, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocab_size_errors_name_the_limit(corpus, tmp_path):
    out = tmp_path / "v"
    (out).mkdir()
    (out / "spiece.model").write_bytes(b"previous")
    with pytest.raises(UserError, match=r"too large .* use at most (\d+)") as err:
        train_vocabulary(corpus, 5000, out)
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(out)) == ["spiece.model"]  # nothing written, nothing half-written
    assert (out / "spiece.model").read_bytes() == b"previous"
    # The re-phrased maximum counts the sentinels, and training at exactly that size works.
    limit = int(re.search(r"at most (\d+)", str(err.value)).group(1))
    assert Vocabulary(train_vocabulary(corpus, limit, tmp_path / "max")).vocab_size == limit
    with pytest.raises(UserError, match=r"too small .* use at least \d+"):
        train_vocabulary(corpus, 120, tmp_path / "small")
    with pytest.raises(UserError, match="too small"):
        train_vocabulary(corpus, 100, tmp_path / "small")
