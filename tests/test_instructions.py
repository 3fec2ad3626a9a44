"""Instruction tasks: every template renders every example, few-shot exemplars, examples-proportional
mixing with a cap, held-out tasks, the user's JSONL instructions, and zero-shot evaluation."""

import itertools
import json
import re

import jax
import numpy as np
import pytest

from t5lite import metrics
from t5lite.data import instructions as I
from t5lite.data import tasks
from t5lite.data.corpora.tfds_builders import read_jsonl_gz
from t5lite.errors import UserError
from t5lite.infer.evaluate import evaluate_task
from t5lite.model import get_config, init_params


@pytest.fixture(scope="module")
def vocab():
    return tasks.default_vocabulary()


def records(source, limit=None):
    if hasattr(source, "__iter__"):  # TFDS sources read in batches
        return list(itertools.islice(source, limit))
    return [source[i] for i in range(len(source) if limit is None else min(limit, len(source)))]


@pytest.mark.parametrize("key", sorted(I.TEMPLATES))
def test_every_template_renders_every_example_of_its_task(key, vocab):
    source_fn, fields_fn, _, options = I.SHIPPED[key]
    examples = records(source_fn("validation")) + records(source_fn("test")) + records(source_fn("train"), 2000)
    templates = I.TEMPLATES[key]
    assert len(templates) >= 3
    for template in templates:
        # The literal text survives the vocabulary (no piece becomes UNK).
        literal = re.sub(r"\{\w+\}", "x", template[0] + " " + template[1])
        assert vocab.unk_id not in vocab.encode(literal), (key, template)
        for example in examples:
            out = I.render_instruction(example, np.random.default_rng(0), name=key, templates=[template],
                                       fields_fn=fields_fn, options=options)
            assert out["targets"].strip() and out["inputs"].strip() and "{" not in out["inputs"], (template, example)
            if options:
                assert out["targets"] in options and "OPTIONS:\n- " in out["inputs"]


def test_a_missing_field_is_one_line_naming_the_template():
    with pytest.raises(UserError, match="cannot be filled") as e:
        I.render_instruction({"a": "x"}, np.random.default_rng(0), name="t", templates=[("{b}", "{a}")], fields_fn=dict)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError):
        I.instruction_task("t_bad", lambda s: [], [("only inputs",)])


def shots_of(text, query):
    """The exemplar blocks before the query (split on the exemplar separator)."""
    assert text.endswith(query)
    head = text[:-len(query)]
    return [block for block in head.split(I.EXEMPLAR_SEPARATOR) if block]


def test_few_shot_exemplars_come_from_train_never_the_example_and_repeat_with_the_seed():
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(6)] + [{"q": "question 0", "a": "answer 0"}]
    task = I.instruction_task("test_few_shot", lambda split: rows, [("Q: {q}", "{a}")], num_shots=5,
                              few_shot_rate=1.0, splits=("train",))
    render = task.preprocessors(feature_lengths=None)[0]
    for i, row in enumerate(rows):
        out = render(dict(row), np.random.default_rng([3, i]))
        shots = shots_of(out["inputs"], f"Q: {row['q']}")
        assert out["num_shots"] == len(shots) == 5
        assert all(f"Q: {row['q']}\n" not in s for s in shots)  # never the example, nor its duplicate
        others = [f"Q: {r['q']}\n{r['a']}" for r in rows if r != row]
        assert set(shots) <= set(others) and (row["q"] != "question 0" or sorted(shots) == sorted(others))
        assert render(dict(row), np.random.default_rng([3, i])) == out  # same seed, same exemplars
    orders = {render(dict(rows[1]), np.random.default_rng([s, 1]))["inputs"] for s in range(10)}
    assert len(orders) > 1  # another seed, other exemplars (order)


def test_shipped_few_shot_exemplars_fit_the_inputs_and_come_from_the_train_split(vocab):
    task = tasks.get("instruct_translate_en_es_few_shot")
    lengths = {"inputs": 160, "targets": 96}
    first = task.eval_examples("validation", vocab, max_examples=30, feature_lengths=lengths)
    again = task.eval_examples("validation", vocab, max_examples=30, feature_lengths=lengths)
    assert [e["inputs_pretokenized"] for e in first] == [e["inputs_pretokenized"] for e in again]
    train_spanish = {r["es_rv1909"] for r in read_jsonl_gz("bible.jsonl.gz") if r["split"] == "train"}
    for ex in first:
        assert len(ex["inputs"]) <= 160 and ex["inputs"][-1] == vocab.eos_id
        assert 0 <= ex["num_shots"] <= 3 and ex["targets_pretokenized"] not in ex["inputs_pretokenized"]
        for block in ex["inputs_pretokenized"].split(I.EXEMPLAR_SEPARATOR):
            if "\n" in block and not block.startswith(("English:", "Spanish:")):
                assert block.rsplit("\n", 1)[1] in train_spanish  # an exemplar's answer: a train verse
    assert 0 < np.mean([ex["num_shots"] for ex in first]) < 3  # some exemplars were dropped to fit 160
    zero = tasks.get("instruct_translate_en_es_zero_shot").eval_examples("validation", vocab, max_examples=30)
    assert all(ex["num_shots"] == 0 for ex in zero)


def literal_marks(key):
    """Each template's longest literal phrase (whitespace collapsed), to recognise a rendered row."""
    marks = []
    for template in I.TEMPLATES[key]:
        pieces = [" ".join(p.split()) for p in re.split(r"\{\w+\}", template[0])]
        marks.append(max(pieces, key=len))
    return marks


def test_held_out_tasks_never_appear_in_the_training_mixture(vocab):
    mix = I.instruction_mixture("test_instruct_mix", cap=30_000)
    names = {t.name for t in mix.tasks}
    held = {key for key in I.TEMPLATES if f"instruct_{key}" in I.HELD_OUT}
    assert held and not any(n.startswith(tuple(f"instruct_{k}" for k in held)) for n in names)
    assert names == {f"instruct_{k}" for k in I.TEMPLATES} - {f"instruct_{k}" for k in held}
    # A variant of a held-out task is held out too, and a nested mixture cannot smuggle one in.
    again = I.instruction_mixture("test_instruct_mix2", tasks=["instruct_translate_en_es", "instruct_name_the_word_few_shot"])
    assert {t.name for t in again.tasks} == {"instruct_translate_en_es"}
    tasks.register_mixture("test_nested", [("instruct_archaize_web_kjv", 1), ("instruct_translate_en_es", 1)])
    with pytest.raises(UserError, match="held-out"):
        tasks.examples_proportional_mixture("bad", ["test_nested"], held_out=["instruct_archaize_web_kjv"])
    # The rows it makes: every one shows a training template, none a held-out one.
    held_marks = [m for k in held for m in literal_marks(k)
                  if not any(m in t for kk in I.TEMPLATES if kk not in held for t in literal_marks(kk))]
    train_marks = [m for k in I.TEMPLATES if k not in held for m in literal_marks(k)]
    it = mix.pipeline("validation", feature_lengths={"inputs": 256, "targets": 128}, batch_size=8, pack=False,
                      process_index=0, process_count=1)
    for batch in (next(it) for _ in range(25)):
        for row in batch["encoder_input_tokens"]:
            text = " ".join(vocab.decode(row).split())
            assert not any(m in text for m in held_marks), text
            assert any(m in text for m in train_marks), text


def test_examples_proportional_rates_with_a_cap(tmp_path):
    sizes = {"a": 10, "b": 30, "c": 100}
    for name, n in sizes.items():
        (tmp_path / f"{name}.tsv").write_text("".join(f"x{i}\ty{i}\n" for i in range(n)), encoding="utf-8")
        tasks.text_to_text_task(f"test_prop_{name}", {"train": str(tmp_path / f"{name}.tsv")})
    names = [f"test_prop_{n}" for n in sizes]
    mix = tasks.examples_proportional_mixture("test_prop", names, cap=50)
    assert [(t.name, r) for t, r in mix.weighted_tasks()] == [
        ("test_prop_a", 10 / 90), ("test_prop_b", 30 / 90), ("test_prop_c", 50 / 90)]
    uncapped = tasks.examples_proportional_mixture("test_prop", names, held_out=["test_prop_b"])
    assert [(t.name, r) for t, r in uncapped.weighted_tasks()] == [("test_prop_a", 10 / 110), ("test_prop_c", 100 / 110)]
    assert tasks.get("instruct_translate_en_es").num_examples("train") == 29827
    assert tasks.get("instruct_identify_language").num_examples("validation") == 2 * 339
    for bad in [dict(cap=0), dict(held_out=names), dict(held_out=["test_prop_zz"])]:
        with pytest.raises(UserError):
            tasks.examples_proportional_mixture("bad", names, **bad)


def test_jsonl_instruction_task(tmp_path, vocab):
    lines = [{"instruction": "Say hi in Spanish.", "input": "", "output": "Hola"},
             {"instruction": "Translate to English.", "input": "gracias", "output": "thank you"}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    task = I.instruction_jsonl_task("test_jsonl", {"train": str(path)}, metrics=["exact_match"])
    examples = task.eval_examples("train", vocab)
    assert [(e["inputs_pretokenized"], e["targets_pretokenized"]) for e in examples] == [
        ("Say hi in Spanish.", "Hola"), ("Translate to English.\n\ngracias", "thank you")]
    custom = I.instruction_jsonl_task("test_jsonl2", {"train": str(path)}, templates=[("Task: {instruction} | {input}", "{output}")])
    assert custom.eval_examples("train", vocab)[1]["inputs_pretokenized"] == "Task: Translate to English. | gracias"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "x"}), encoding="utf-8")
    bad = I.instruction_jsonl_task("test_jsonl_bad", {"train": str(tmp_path / "bad.jsonl")})
    with pytest.raises(UserError, match="record 1 has no output"):
        bad.eval_examples("train", vocab)
    with pytest.raises(UserError):
        I.instruction_jsonl_task("t", {"train": str(tmp_path / "none*.jsonl")})


def test_held_out_zero_shot_tasks_have_examples_and_metrics(vocab):
    for name in I.HELD_OUT:
        task = tasks.get(f"{name}_zero_shot")
        examples = task.eval_examples("validation", vocab, max_examples=20)
        targets = [ex["targets_pretokenized"] for ex in examples]
        scores = metrics.compute(list(task.metrics), targets, targets)  # a perfect prediction scores 100
        assert len(examples) == 20 and task.metrics and all(v == pytest.approx(100) for v in scores.values())


@pytest.mark.slow
def test_held_out_zero_shot_task_evaluates_end_to_end(vocab):
    config = get_config("tiny", vocab_size=8192)
    params = init_params(config, jax.random.key(0))
    results, _ = evaluate_task(config, params, tasks.get("instruct_identify_language_zero_shot"), vocab,
                               split="validation", max_examples=4, batch_size=4, input_length=96, max_decode_length=4)
    assert results["num_examples"] == 4 and "accuracy" in results and np.isfinite(results["perplexity"])
