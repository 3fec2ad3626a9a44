"""Task / Mixture registry, the shipped tasks and vocabulary, mixtures, and tasks from the user's files.

The shipped corpora are read from the default data_dir ($T5LITE_DATA_DIR or ~/.cache/t5lite/tfds),
built there on first use (~15 s once, then ~1 ms), so repeated runs stay fast.
"""

import json
import os

import numpy as np
import pytest

from t5lite.data import pipeline, sources, tasks
from t5lite.errors import UserError

SPAN_LENGTHS = tasks.span_corruption_feature_lengths(64)  # {'inputs': 64, 'targets': 14}
LENGTHS = {"inputs": 96, "targets": 96}


@pytest.fixture(scope="module")
def vocab():
    return tasks.default_vocabulary()


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def take(it, n):
    return [next(it) for _ in range(n)]


# --- Registry ---------------------------------------------------------------------------------


def test_registry_lookups_and_close_match_errors():
    shipped = {"bible_span_corruption_en", "bible_span_corruption_en_es", "bible_translate_en_es",
               "bible_modernize_kjv_web", "wordnet_define", "bible_en_es_mix"}
    assert shipped <= set(tasks.names()) and tasks.names() == sorted(tasks.names())
    task = tasks.get("wordnet_define")
    assert isinstance(task, tasks.Task) and tasks.get(task) is task
    assert isinstance(tasks.get("bible_en_es_mix"), tasks.Mixture)
    assert tasks.get("bible_translate_en_es").metrics == ("bleu", "chrf")

    msg = one_line_error(tasks.get, "bible_translate_en_fr")
    assert "did you mean bible_translate_en_es" in msg and all(name in msg for name in shipped)
    assert "did you mean" not in one_line_error(tasks.get, "zzz")
    one_line_error(tasks.register, task)  # the name is taken
    assert tasks.register(task, replace=True) is task
    one_line_error(tasks.Mixture, "bad_mix", [("wordnet_defne", 1.0)])  # unknown task, suggested
    one_line_error(tasks.Mixture, "bad_mix", [("wordnet_define", 0.0)])
    one_line_error(tasks.Mixture, "bad_mix", ["wordnet_define"])
    one_line_error(tasks.Task, "t", lambda s: [], lambda v, fl: [], metrics=("blue",))
    one_line_error(tasks.get("bible_translate_en_es").source, "dev")
    one_line_error(tasks.get("bible_translate_en_es").source, "validation[:0]")  # empty split


# --- The shipped vocabulary -------------------------------------------------------------------


def test_shipped_vocabulary_has_t5_layout_and_round_trips_english_and_spanish(vocab):
    assert os.path.getsize(tasks.VOCAB_PATH) < 1_000_000
    assert vocab.vocab_size == 8192 and (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert [vocab.id_to_piece(8191 - i) for i in range(100)] == [f"<extra_id_{i}>" for i in range(100)]
    assert vocab.id_to_piece(8091) != "<extra_id_100>" and not vocab.id_to_piece(8091).startswith("<")
    for text in ["In the beginning, God created the heavens and the earth.",
                 "¿Dónde está el niño? ¡Él comió pingüino en Año Nuevo, señor!",
                 "ÁÉÍÓÚÜÑ áéíóúüñ «comillas» “quotes” — a dash",
                 "Bendito Jehová, que oyó la voz de mis ruegos."]:
        ids = vocab.encode(text)
        assert vocab.unk_id not in ids and vocab.decode(ids + [1, 5]) == text
    # Both languages are covered by real pieces: few tokens per word on held-out verses.
    verses = list(sources.shipped("bible", "validation"))
    for field, limit in [("en_web", 1.5), ("en_kjv", 1.5), ("es_rv1909", 1.7)]:
        texts = [v[field] for v in verses]
        ratio = sum(map(len, vocab.encode_batch(texts))) / sum(len(t.split()) for t in texts)
        assert 1.0 < ratio < limit, (field, ratio)


# --- Shipped text-to-text tasks ----------------------------------------------------------------


def bible_fields(prefix, inputs_key, targets_key):
    return lambda record: (prefix + record[inputs_key], record[targets_key])


def define_fields(record):
    example = f", as in: {record['examples'][0]}" if record["examples"] else ""
    return f"define: {record['word']} ({record['pos']}){example}", record["definition"]


EXPECTED = {
    "bible_translate_en_es": bible_fields("translate English to Spanish: ", "en_web", "es_rv1909"),
    "bible_modernize_kjv_web": bible_fields("modernize: ", "en_kjv", "en_web"),
    "wordnet_define": define_fields,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_text_to_text_task_prefixes_inputs_and_batches_match(name, vocab):
    task = tasks.get(name)
    examples = task.eval_examples("validation", max_examples=5)
    records = [task.source("validation")[i] for i in range(5)]
    assert len(examples) == 5
    for example, record in zip(examples, records):
        inputs, targets = EXPECTED[name](record)
        assert (example["inputs_pretokenized"], example["targets_pretokenized"]) == (inputs, targets)
        assert example["inputs"][-1] == example["targets"][-1] == vocab.eos_id
        assert vocab.decode(example["inputs"]) == inputs and vocab.decode(example["targets"]) == targets
    assert task.postprocess("  a definition \n") == "a definition"

    # Trimmed to feature_lengths, EOS kept.
    short = task.eval_examples("validation", max_examples=5, feature_lengths={"inputs": 6, "targets": 4})
    assert all(len(e["inputs"]) <= 6 and e["inputs"][-1] == 1 and e["targets"][-1] == 1 for e in short)

    # Unshuffled, unpacked training batches hold the same examples in the same order.
    it = task.pipeline("validation", feature_lengths=LENGTHS, batch_size=5, shuffle=False, pack=False,
                       process_index=0, process_count=1)
    batch = next(it)
    assert vocab.decode_batch(batch["encoder_input_tokens"]) == \
        [vocab.decode(e["inputs"][:LENGTHS["inputs"]]) for e in examples]
    assert vocab.decode_batch(batch["decoder_target_tokens"]) == \
        [vocab.decode(e["targets"][:LENGTHS["targets"]]) for e in examples]


# --- Span corruption ---------------------------------------------------------------------------


def test_span_corruption_task_batches_have_sentinels_and_both_languages(vocab):
    task = tasks.get("bible_span_corruption_en_es")
    assert len(task.source("validation")) == 2 * len(tasks.get("bible_translate_en_es").source("validation"))
    it = task.pipeline("validation", feature_lengths=SPAN_LENGTHS, batch_size=4, pack=False,
                       process_index=0, process_count=1)
    text = []
    for batch in take(it, 6):
        inputs, targets = batch["encoder_input_tokens"], batch["decoder_target_tokens"]
        assert inputs.shape == (4, 64) and targets.shape == (4, SPAN_LENGTHS["targets"])
        assert (inputs >= vocab.vocab_size - 100).any(axis=1).all()  # every row has a sentinel
        assert (targets[:, 0] == vocab.sentinel_id(0)).all()  # targets open with <extra_id_0>
        # Filling each sentinel with its span gives back the uncorrupted text.
        for row_in, row_tg in zip(inputs, targets):
            spans = vocab.decode(row_tg).split("<extra_id_")
            filled = vocab.decode(row_in)
            for span in spans[1:]:
                index, words = span.split(">", 1)
                filled = filled.replace(f"<extra_id_{index}>", words, 1)
            assert "<extra_id_" not in filled
            text.append(filled)
    text = " ".join(text)
    assert " the " in text and (" de " in text or " Jehová" in text)  # English and Spanish verses

    one_line_error(task.eval_examples, "validation")  # nothing to decode: scored by loss
    msg = one_line_error(task.pipeline, "validation", feature_lengths={"inputs": 64, "targets": 8},
                         batch_size=2, process_index=0, process_count=1)
    assert "'targets' to 14" in msg


# --- Mixtures ----------------------------------------------------------------------------------


def test_mixture_rates_follow_weights(vocab):
    mix = tasks.register_mixture("test_mix_3_1", [["bible_translate_en_es", 3],
                                                  ("bible_modernize_kjv_web", 1.0)])
    assert tasks.get("test_mix_3_1") is mix
    assert [(t.name, r) for t, r in mix.weighted_tasks()] == \
        [("bible_translate_en_es", 0.75), ("bible_modernize_kjv_web", 0.25)]
    nested = tasks.Mixture("nested", [("test_mix_3_1", 1), ("wordnet_define", 1)])
    assert [r for _, r in nested.weighted_tasks()] == [0.375, 0.125, 0.5]
    assert mix.splits == ("train", "validation", "test")

    it = mix.pipeline("validation", feature_lengths=LENGTHS, batch_size=8, pack=False,
                      process_index=0, process_count=1)
    batches = [[vocab.decode(r) for r in b["encoder_input_tokens"]] for b in take(it, 50)]
    rows = [r for b in batches for r in b]
    translate = sum(r.startswith("translate English to Spanish: ") for r in rows)
    modernize = sum(r.startswith("modernize: ") for r in rows)
    # Random draws at rate 0.75: 400 rows give a binomial standard deviation of ~0.022.
    assert translate + modernize == 400 and abs(translate / 400 - 0.75) <= 0.07
    # Each of the 8 data shards draws on its own: batches are mixed, not all one task (P ~ 0.1 each).
    assert sum(len({r.split(":")[0] for r in b}) == 1 for b in batches) < 15


def test_packed_mixture_resumes_exactly_from_saved_state():
    mix = tasks.get("bible_en_es_mix")  # span corruption (a concatenate-and-split stage) + translation
    kwargs = dict(feature_lengths=SPAN_LENGTHS, batch_size=4, seed=3, process_index=0, process_count=1)
    it = mix.pipeline("validation", **kwargs)
    first = take(it, 3)
    state = pipeline.iterator_state(it)
    expected = take(it, 4)
    again = mix.pipeline("validation", **kwargs)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, take(again, 3)) for k in a)
    restored = mix.pipeline("validation", **kwargs)
    pipeline.restore_iterator(restored, state)
    for a, b in zip(expected, take(restored, 4)):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])
               for a, b in zip(first, take(mix.pipeline("validation", **{**kwargs, "seed": 4}), 3)))


# --- The user's own tasks ----------------------------------------------------------------------


def test_user_tasks_from_tsv_and_jsonl_files(tmp_path, vocab):
    (tmp_path / "train-0.tsv").write_text("hola\thello\nadiós\tgoodbye\n", encoding="utf-8")
    (tmp_path / "train-1.tsv").write_text("gracias\tthank you\n", encoding="utf-8")
    (tmp_path / "dev.jsonl").write_text(
        "\n".join(json.dumps({"src": s, "tgt": t, "extra": 1}, ensure_ascii=False)
                  for s, t in [("sí", "yes"), ("niño", "child")]), encoding="utf-8")

    task = tasks.text_to_text_task("my_tsv", {"train": str(tmp_path / "train-*.tsv")},
                                   prefix="translate Spanish to English: ", metrics=["exact_match"])
    assert tasks.get("my_tsv") is task and task.splits == ("train",) and task.metrics == ("exact_match",)
    examples = task.eval_examples("train")
    assert [(e["inputs_pretokenized"], e["targets_pretokenized"]) for e in examples] == [
        ("translate Spanish to English: hola", "hello"), ("translate Spanish to English: adiós", "goodbye"),
        ("translate Spanish to English: gracias", "thank you")]
    assert vocab.decode(examples[1]["inputs"]) == "translate Spanish to English: adiós"
    batch = next(task.pipeline("train", feature_lengths={"inputs": 16, "targets": 8}, batch_size=2,
                               process_index=0, process_count=1))
    assert batch["encoder_input_tokens"].shape == (2, 16) and batch["decoder_target_tokens"].shape == (2, 8)

    jsonl = tasks.text_to_text_task("my_jsonl", {"validation": str(tmp_path / "dev.jsonl")},
                                    format="jsonl", inputs_key="src", targets_key="tgt")
    assert [(e["inputs_pretokenized"], e["targets_pretokenized"])
            for e in jsonl.eval_examples("validation", max_examples=1)] == [("sí", "yes")]

    # Bad input: one line naming the fix.
    assert "nothing*.tsv" in one_line_error(tasks.text_to_text_task, "t", {"train": str(tmp_path / "nothing*.tsv")})
    one_line_error(tasks.text_to_text_task, "t", {"train": str(tmp_path / "dev.jsonl")}, format="csv")
    one_line_error(tasks.text_to_text_task, "t", {})
    assert "use one of train" in one_line_error(task.eval_examples, "validation")
    assert "cannot be sliced" in one_line_error(task.eval_examples, "train[:1]")
    (tmp_path / "empty.tsv").write_text("\n", encoding="utf-8")
    empty = tasks.text_to_text_task("my_empty", {"train": str(tmp_path / "empty.tsv")})
    assert "no records" in one_line_error(empty.eval_examples, "train")
    bad = tasks.text_to_text_task("my_bad", {"train": str(tmp_path / "dev.jsonl")}, format="tsv")
    assert "dev.jsonl:1" in one_line_error(bad.eval_examples, "train")
