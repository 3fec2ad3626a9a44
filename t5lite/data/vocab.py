"""SentencePiece vocabulary with T5's layout: pad 0, EOS 1, UNK 2, sentinels on top.

The 100 sentinels `<extra_id_0..99>` are the top 100 ids, `<extra_id_0>` = vocab_size - 1,
so span corruption can count sentinel ids down from the top without knowing any piece.
The serialized model travels with checkpoints (`serialized_model` / `from_bytes`).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from t5lite.errors import UserError

NUM_SENTINELS = 100
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_FIX = ("retrain it with `t5lite vocab train` "
        "(or load T5's original 32000-piece spiece.model with extra_ids=100)")


def sentinel_piece(i: int) -> str:
    return f"<extra_id_{i}>"


def _append_sentinels(model_bytes: bytes, n: int = NUM_SENTINELS) -> bytes:
    """Append `<extra_id_{n-1}>` ... `<extra_id_0>` as USER_DEFINED pieces, so `<extra_id_0>` is last."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    for i in reversed(range(n)):
        proto.pieces.add(piece=sentinel_piece(i), score=0.0,
                         type=spm_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return proto.SerializeToString()


class Vocabulary:
    """A loaded SentencePiece model; `require_sentinels` checks the T5 layout described above."""

    def __init__(self, model_path: str | os.PathLike, *, require_sentinels: bool = True,
                 extra_ids: int = 0):
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise UserError(f"vocabulary file {path} does not exist: pass the path of a "
                            "SentencePiece .model, or train one with `t5lite vocab train`")
        with open(path, "rb") as f:
            self._load(f.read(), path, require_sentinels, extra_ids)

    @classmethod
    def from_bytes(cls, model_bytes: bytes, *, require_sentinels: bool = True,
                   extra_ids: int = 0) -> "Vocabulary":
        """Rebuild a vocabulary from `serialized_model` (e.g. the copy stored in a checkpoint)."""
        vocab = cls.__new__(cls)
        vocab._load(bytes(model_bytes), "<serialized model>", require_sentinels, extra_ids)
        return vocab

    def _load(self, model_bytes: bytes, name: str, require_sentinels: bool, extra_ids: int):
        if extra_ids:
            try:
                model_bytes = _append_sentinels(model_bytes, extra_ids)
            except Exception as e:  # protobuf DecodeError
                raise UserError(f"{name} is not a SentencePiece model ({e}): pass a .model file") from None
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # RuntimeError from the C++ parser, e.g. duplicate pieces
            detail = (str(e).strip().splitlines() or [""])[-1]
            detail = "cannot parse it" if "ParseFromArray" in detail or not detail else detail
            raise UserError(f"{name} is not a loadable SentencePiece model (sentencepiece: "
                            f"{detail}): pass a .model file") from None
        self._name = name
        if require_sentinels:
            self._check_t5_layout()

    def _check_t5_layout(self):
        sp, n, name = self._sp, self._sp.get_piece_size(), self._name
        if (sp.pad_id(), sp.eos_id()) != (PAD_ID, EOS_ID):
            raise UserError(f"{name} has pad id {sp.pad_id()} and EOS id {sp.eos_id()}, "
                            f"T5 needs pad 0 and EOS 1: {_FIX}")
        for i in range(NUM_SENTINELS):
            if n - 1 - i < 0 or sp.id_to_piece(n - 1 - i) != sentinel_piece(i):
                raise UserError(f"{name} lacks the {NUM_SENTINELS} sentinels <extra_id_0..99> at "
                                f"the top of its {n} ids (<extra_id_{i}> is not id {n - 1 - i}): {_FIX}")

    # --- Layout -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def num_sentinels(self) -> int:
        return NUM_SENTINELS

    def sentinel_id(self, i: int) -> int:
        """Id of `<extra_id_i>`: vocab_size - 1 - i."""
        if not 0 <= i < NUM_SENTINELS:
            raise ValueError(f"sentinel index {i} outside 0..{NUM_SENTINELS - 1}")
        return self.vocab_size - 1 - i

    @property
    def serialized_model(self) -> bytes:
        return self._sp.serialized_model_proto()

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def __repr__(self) -> str:
        return f"Vocabulary({self._name!r}, vocab_size={self.vocab_size})"

    # --- Encode / decode ----------------------------------------------------------------------

    def encode(self, text: str | bytes) -> list[int]:
        """Text -> ids, without EOS (appending EOS is a preprocessor's job)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        return self._sp.encode(texts, out_type=int)

    def _clean(self, ids: Iterable[int]) -> list[int]:
        """Cut at the first EOS, drop pad, map ids outside the model (padded logits) to UNK."""
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(i if 0 <= i < self.vocab_size else self.unk_id)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; stops at EOS, drops pad, sentinels render as `<extra_id_N>`."""
        return self._sp.decode(self._clean(ids))

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return self._sp.decode([self._clean(ids) for ids in batch])


# --- Training ---------------------------------------------------------------------------------


def _read_lines(files: Sequence[str]) -> Iterator[str]:
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line


def _training_error(e: RuntimeError, vocab_size: int, files: Sequence[str]) -> UserError | None:
    """Re-phrase sentencepiece's size errors in terms of the total size (pieces + sentinels)."""
    msg = str(e)
    where = files[0] if len(files) == 1 else f"{len(files)} input files"
    if m := re.search(r"Vocabulary size too high.*<= (\d+)", msg):
        return UserError(f"vocab_size {vocab_size} is too large for the text in {where}: use at "
                         f"most {int(m.group(1)) + NUM_SENTINELS} (or add more text)")
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
        return UserError(f"vocab_size {vocab_size} is too small for the characters in {where}: use "
                         f"at least {int(m.group(1)) + NUM_SENTINELS} (or lower character_coverage)")
    return None


def _write_atomic(path: str, data: bytes):
    """Write to a temp file in the same directory, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a vocabulary is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def train_vocabulary(input_files: str | Sequence[str], vocab_size: int, out_dir: str | os.PathLike,
                     *, model_type: str = "unigram", character_coverage: float = 0.9995,
                     max_sentences: int = 1_000_000, num_threads: int = 2,
                     **trainer_options) -> str:
    """Train a T5-layout SentencePiece model on text files (one sentence a line, .gz allowed).

    Trains `vocab_size - 100` pieces, then appends the 100 sentinels on top, like T5's
    spiece.model + extra ids. Writes out_dir/spiece.model and .vocab; returns the .model path.
    """
    files = [os.fspath(input_files)] if isinstance(input_files, (str, os.PathLike)) \
        else [os.fspath(f) for f in input_files]
    if not files:
        raise UserError("no input files to train the vocabulary on: pass one or more text files")
    for path in files:
        if not os.path.isfile(path):
            raise UserError(f"vocabulary training input {path} does not exist: pass existing text files")
    if vocab_size <= NUM_SENTINELS + 3:
        raise UserError(f"vocab_size {vocab_size} is too small: it must exceed {NUM_SENTINELS + 3} "
                        f"(pad, EOS, UNK and {NUM_SENTINELS} sentinels) plus the corpus's characters")
    lines = _read_lines(files)
    if next(_read_lines(files), None) is None:
        raise UserError(f"vocabulary training inputs {files} hold no text: pass non-empty text files")

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, model_type=model_type,
            vocab_size=vocab_size - NUM_SENTINELS, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            bos_id=-1, character_coverage=character_coverage, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=num_threads, minloglevel=2, **trainer_options)
    except RuntimeError as e:
        if err := _training_error(e, vocab_size, files):
            raise err from None
        raise
    model_bytes = _append_sentinels(model.getvalue())

    # Verify the layout before anything touches disk.
    vocab = Vocabulary.from_bytes(model_bytes)
    assert vocab.vocab_size == vocab_size, (vocab.vocab_size, vocab_size)
    assert vocab.encode("<extra_id_0>")[-1] == vocab_size - 1
    assert vocab.decode(vocab.encode("a <extra_id_3> b")).count("<extra_id_3>") == 1

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    vocab_text = "".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces).encode("utf-8")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "spiece.model")
    _write_atomic(os.path.join(out_dir, "spiece.vocab"), vocab_text)
    _write_atomic(model_path, model_bytes)
    return model_path
