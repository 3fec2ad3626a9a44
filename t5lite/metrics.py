"""Text metrics by name, each `fn(targets, predictions) -> {name: float}` on 0..100 scales.

Standard implementations only (sacrebleu for BLEU/chrF, Google's rouge-score for ROUGE), so
numbers are comparable with published ones. Each is registered (t5lite/registry.py) as kind
'metric', so a task can name one of the user's own. Imports only the registry, so tasks can name
metrics without pulling in the model or the trainer.
"""

from typing import Callable, Dict, List, Sequence

from t5lite import registry
from t5lite.registry import register

Metric = Callable[[Sequence[str], Sequence[str]], Dict[str, float]]


def _check(targets: Sequence[str], predictions: Sequence[str]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions; score them pairwise")


@register("metric", "bleu")
def bleu(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
    """Corpus BLEU with sacrebleu's defaults (13a tokenizer, exp smoothing), like T5's eval."""
    import sacrebleu
    _check(targets, predictions)
    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score)}


@register("metric", "chrf")
def chrf(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
    """Corpus chrF (character n-gram F-score, beta 2), robust for morphologically rich languages."""
    import sacrebleu
    _check(targets, predictions)
    return {"chrf": float(sacrebleu.corpus_chrf(list(predictions), [list(targets)]).score)}


@register("metric", "rouge")
def rouge(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
    """Mean ROUGE-1/2/Lsum F-measure (Porter stemming), as T5 reports for summarisation."""
    from rouge_score import rouge_scorer
    _check(targets, predictions)
    kinds = ["rouge1", "rouge2", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    totals = {k: 0.0 for k in kinds}
    for target, prediction in zip(targets, predictions):
        scores = scorer.score(target, prediction)
        for k in kinds:
            totals[k] += scores[k].fmeasure
    n = max(len(targets), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


@register("metric", "exact_match")
def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
    """Percentage of predictions equal to their target after stripping surrounding whitespace."""
    _check(targets, predictions)
    hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions))
    return {"exact_match": 100.0 * hits / max(len(targets), 1)}


@register("metric", "accuracy")
def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
    """Classification accuracy: exact match of label strings, in percent."""
    return {"accuracy": exact_match(targets, predictions)["exact_match"]}


def get_metric(name: str) -> Metric:
    return registry.get("metric", name)


def compute(names: List[str], targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
    """All named metrics merged into one dict."""
    out: Dict[str, float] = {}
    for name in names:
        out.update(get_metric(name)(targets, predictions))
    return out
