"""Build the shipped vocabulary `spiece.model` (+ `.vocab`) from the shipped corpora.

    .venv/bin/python t5lite/data/corpora/build_vocab.py            # from the repo root, ~1 min

A T5-layout unigram SentencePiece model (pad 0, EOS 1, UNK 2, `<extra_id_0..99>` on top) trained
on the TRAIN splits only, so validation/test text never shapes the pieces: the Bible's English
(WEB + KJV) and Spanish (RV1909) verses plus WordNet definitions and usage examples. The Spanish
verses are repeated (`--spanish_repeats`) so Spanish, a sixth of the raw text, gets pieces of its own.
Deterministic: the same corpora give a byte-identical model. Prints tokens per word per language.
"""

import argparse
import os
import re
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make `t5lite` importable from the repo root
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3)))

from t5lite.data.corpora.tfds_builders import CORPORA_DIR, read_jsonl_gz  # noqa: E402
from t5lite.data.vocab import Vocabulary, train_vocabulary  # noqa: E402

VOCAB_SIZE = 8192  # pieces including the 100 sentinels; small keeps the demo's softmax cheap
SPANISH_REPEATS = 2
# Every character of the corpus gets a piece (coverage 1.0: capitals like "É" in "Él" are rare but
# must not become UNK), plus Spanish letters and quotes the corpus may lack.
REQUIRED_CHARS = "ÁÉÍÓÚÜÑáéíóúüñ¿¡«»"


def training_lines(split: str = "train", spanish_repeats: int = SPANISH_REPEATS) -> dict[str, list[str]]:
    """The text of one split, one sentence-ish line each, by language: {'en': [...], 'es': [...]}."""
    bible = [r for r in read_jsonl_gz("bible.jsonl.gz") if r["split"] == split]
    wordnet = [r for r in read_jsonl_gz("wordnet.jsonl.gz") if r["split"] == split]
    english = [r["en_web"] for r in bible] + [r["en_kjv"] for r in bible]
    english += [r["definition"] for r in wordnet] + [e for r in wordnet for e in r["examples"]]
    spanish = [r["es_rv1909"] for r in bible] * spanish_repeats
    return {"en": english, "es": spanish}


def tokens_per_word(vocab: Vocabulary, lines: list[str]) -> float:
    """Pieces per whitespace-separated word over `lines` (1.0 = every word is one piece)."""
    words = sum(len(line.split()) for line in lines)
    return sum(len(ids) for ids in vocab.encode_batch(lines)) / max(words, 1)


def coverage_report(vocab: Vocabulary, split: str = "validation") -> dict[str, float]:
    """Tokens per word on held-out text: WEB, KJV, RV1909 verses and WordNet definitions."""
    bible = [r for r in read_jsonl_gz("bible.jsonl.gz") if r["split"] == split]
    wordnet = [r["definition"] for r in read_jsonl_gz("wordnet.jsonl.gz") if r["split"] == split]
    report = {field: tokens_per_word(vocab, [r[field] for r in bible])
              for field in ("en_web", "en_kjv", "es_rv1909")}
    report["wordnet_definition"] = tokens_per_word(vocab, wordnet)
    unk = sum(ids.count(vocab.unk_id) for ids in vocab.encode_batch(
        [r["es_rv1909"] for r in bible] + [r["en_web"] for r in bible]))
    report["unk_tokens"] = unk
    return report


def build(out_dir: str = CORPORA_DIR, vocab_size: int = VOCAB_SIZE,
          spanish_repeats: int = SPANISH_REPEATS) -> str:
    """Train the vocabulary into out_dir; returns the path of spiece.model."""
    lines = training_lines("train", spanish_repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "text.txt")
        with open(path, "w", encoding="utf-8") as f:
            for line in lines["en"] + lines["es"]:
                f.write(re.sub(r"\s+", " ", line).strip() + "\n")
        # One thread: two builds were checked to give byte-identical models this way.
        return train_vocabulary(path, vocab_size, out_dir, model_type="unigram",
                                character_coverage=1.0, required_chars=REQUIRED_CHARS,
                                num_threads=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=CORPORA_DIR, help="where spiece.model/.vocab go")
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE, help="pieces incl. 100 sentinels")
    parser.add_argument("--spanish_repeats", type=int, default=SPANISH_REPEATS)
    args = parser.parse_args(argv)
    model_path = build(args.out_dir, args.vocab_size, args.spanish_repeats)
    vocab = Vocabulary(model_path)
    print(f"{model_path}: {vocab.vocab_size} pieces, {os.path.getsize(model_path)} bytes")
    for name, value in coverage_report(vocab).items():
        print(f"  {name}: {value:.3f}" if isinstance(value, float) else f"  {name}: {value}")


if __name__ == "__main__":
    main()
