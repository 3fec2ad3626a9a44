"""Metrics equal the libraries' own results and closed-form values on fixed strings."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from t5lite import metrics
from t5lite.errors import UserError

TARGETS = ["the cat sat on the mat", "En el principio creó Dios los cielos y la tierra.", "a b c d"]
PREDICTIONS = ["the cat is on the mat", "En el principio creó Dios el cielo y la tierra.", "x y z w"]


def test_bleu_and_chrf_equal_sacrebleu():
    assert metrics.bleu(TARGETS, PREDICTIONS)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [TARGETS]).score)
    assert metrics.chrf(TARGETS, PREDICTIONS)["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(PREDICTIONS, [TARGETS]).score)
    assert metrics.bleu(TARGETS, TARGETS)["bleu"] == pytest.approx(100.0)
    assert metrics.bleu(["a b c d"], ["w x y z"])["bleu"] == pytest.approx(0.0)


def test_rouge_equals_rouge_score_means():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    per_pair = [scorer.score(t, p) for t, p in zip(TARGETS, PREDICTIONS)]
    ours = metrics.rouge(TARGETS, PREDICTIONS)
    for kind in ("rouge1", "rouge2", "rougeLsum"):
        assert ours[kind] == pytest.approx(100 * sum(s[kind].fmeasure for s in per_pair) / 3)
    # Closed form for one pair: 5 of 6 unigrams shared -> P = R = F = 5/6.
    assert metrics.rouge([TARGETS[0]], [PREDICTIONS[0]])["rouge1"] == pytest.approx(100 * 5 / 6)


def test_exact_match_accuracy_and_registry():
    assert metrics.exact_match(["a", "b ", "c"], ["a", "b", "d"])["exact_match"] == pytest.approx(200 / 3)
    assert metrics.compute(["accuracy", "bleu"], TARGETS, TARGETS) == {"accuracy": 100.0, "bleu": pytest.approx(100.0)}
    with pytest.raises(UserError, match="choose from"):
        metrics.get_metric("meteor")
    with pytest.raises(ValueError, match="pairwise"):
        metrics.bleu(["a"], ["a", "b"])
