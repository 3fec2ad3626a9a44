"""The catalog of tasks and mixtures by name: the shipped ones, and the recipes that register more.

Importing this module registers every shipped task (the instruction tasks through instructions.py)
in the one registry of task_registry.py, whose names it hands on, so `tasks.get(name)`,
`tasks.Task`, `tasks.text_to_text_task` ... are one import away. The shipped tasks run offline on
the shipped corpora and vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import numpy as np

from t5lite.data import objectives
from t5lite import registry
from t5lite.data import sources
from t5lite.data.task_registry import (SPLITS, VOCAB_PATH, Documents, FeatureLengths, Mixture,
                                       PreprocessorsFn, Task, causal_lm_preprocessors, default_vocabulary,
                                       examples_proportional_mixture, get, names, prefix_lm_preprocessors,
                                       register, register_mixture, span_corruption_feature_lengths,
                                       span_corruption_preprocessors, text_infilling_preprocessors,
                                       text_to_text_preprocessors,
                                       ul2_feature_lengths, ul2_preprocessors)
from t5lite.errors import UserError

def objective_task(name: str, objective: str, corpus_task: str = "bible_span_corruption_en_es",
                   text_key: str = "text", **options) -> Task:
    """Register (or replace) a task that trains the registered `objective` (span_corruption, ul2,
    prefix_lm, causal_lm or one of the user's own) on the documents of a registered task (its source
    and splits); `options` go to the objective's recipe maker."""
    corpus = get(corpus_task)
    if isinstance(corpus, Mixture):
        raise UserError(f"objective_task {name!r}: corpus_task {corpus_task!r} is a mixture; name one task")
    recipe = registry.get("objective", objective)(text_key=text_key, **options)
    return register(Task(name, corpus.source_fn, recipe, splits=corpus.splits, objective=objective,
                         description=f"{objective} of the documents of {corpus.name}"), replace=True)


def ul2_task(name: str, corpus_task: str = "bible_span_corruption_en_es", rates="uniform",
             denoisers: Sequence = objectives.UL2_DENOISERS, mode_tokens: bool = True,
             text_key: str = "text", raw_length: int | None = None) -> Task:
    """Register (or replace) a UL2 task over the documents of a registered task (its source and
    splits), e.g. c4_span_corruption; rates 'uniform', 'ul2r', {kind: share} or one per denoiser."""
    corpus = get(corpus_task)
    if not isinstance(corpus, Task):
        raise UserError(f"ul2_task {name!r}: corpus_task {corpus_task!r} is a mixture: name one task")
    denoisers = tuple(objectives.as_denoiser(d) for d in denoisers)
    objectives.mixing_rates(denoisers, rates)  # bad rates fail now, not when the pipeline is built
    recipe = ul2_preprocessors(text_key, denoisers=denoisers, rates=rates, raw_length=raw_length,
                               mode_tokens=objectives.MODE_TOKENS if mode_tokens else None)
    return register(Task(name, corpus.source_fn, recipe, splits=corpus.splits, objective="ul2",
                         description=f"UL2 ({', '.join(map(str, denoisers))}; rates {rates}) of "
                                     f"{corpus_task}'s documents"), replace=True)


class Subset:
    """Records `indices` of a random-access source, in that order."""

    def __init__(self, source, indices: Sequence[int]):
        self._source, self.indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self._source[self.indices[index]]

    def __getitems__(self, positions: Sequence[int]) -> list[dict]:
        if hasattr(self._source, "__getitems__"):  # one batched read of a TFDS source
            return self._source.__getitems__([self.indices[p] for p in positions])
        return [self[p] for p in positions]


def subset_indices(num_records: int, size: int, seed: int) -> list[int]:
    """`size` record indices of range(num_records) drawn with `seed`, sorted. The first `size` of one
    seeded permutation, so for one seed a smaller subset lies inside every larger one."""
    return sorted(np.random.default_rng(seed).permutation(num_records)[:size].tolist())


def train_subset_task(task: str = "bible_translate_en_es", size: int | None = 2000, seed: int = 0,
                      name: str | None = None) -> Task:
    """Register (or replace) `task` with its train split cut to `size` records drawn with `seed` (None:
    all); its other splits (validation, test) are the task's own, so the subset never overlaps them.

    The limited-labelled-data regime of fine-tuning: e.g. 2,000 of 29,827 parallel verses."""
    base = get(task)
    if not isinstance(base, Task) or "train" not in base.splits:
        raise UserError(f"train_subset_task: {task!r} must be a task with a train split, not a mixture")
    total = base.num_examples("train")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer))
                             or not 1 <= size <= total):
        raise UserError(f"train_subset_task: size {size!r} must be an integer in [1, {total}] (the train "
                        f"records of {task!r}) or None for all of them")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UserError(f"train_subset_task: seed {seed!r} must be an integer in [0, 2**32)")
    size = total if size is None else int(size)
    indices = subset_indices(total, size, int(seed))

    def source_fn(split):
        if split == "train":
            return Subset(base.source("train"), indices)
        if split.split("[")[0] == "train":
            raise UserError(f"task {name!r}: the train subset cannot be sliced; use split 'train'")
        return base.source(split)

    name = name or f"{base.name}_train{size}_seed{seed}"
    return register(dataclasses.replace(base, name=name, source_fn=source_fn,
                                        description=f"{size} of the {total} train records of {base.name} "
                                                    f"(seed {seed}); its own validation and test"), replace=True)


# --- The user's own text-to-text task from files ---------------------------------------------------


def text_to_text_task(name: str, paths: Mapping[str, str | Sequence[str]], format: str = "tsv",
                      prefix: str = "", inputs_key: str = "inputs", targets_key: str = "targets",
                      metrics: Sequence[str] = ("bleu",)) -> Task:
    """Register (or replace) and return a task reading TSV or JSONL files: {split: path or glob}.

    TSV lines are `inputs<TAB>targets`; JSONL objects need `inputs_key` and `targets_key`.
    The files are checked now (missing ones fail here) and read on first use of a split.
    """
    fmt = str(format).lower()
    if fmt not in ("tsv", "jsonl"):
        raise UserError(f"task {name!r}: format {format!r} is not supported: use 'tsv' or 'jsonl'")
    if not isinstance(paths, Mapping) or not paths:
        raise UserError(f"task {name!r}: paths must map split names to files, e.g. "
                        "{'train': 'data/train.tsv', 'validation': 'data/dev.tsv'}")
    for pattern in paths.values():
        sources.expand(pattern)  # UserError naming a path or glob that matches nothing
    source_class = sources.TsvSource if fmt == "tsv" else sources.JsonlSource

    @functools.lru_cache(maxsize=None)
    def source_fn(split):
        if split not in paths:  # Task.source checked the name, so this is a slice like 'train[:10]'
            raise UserError(f"task {name!r} reads files: split {split!r} cannot be sliced; use "
                            f"one of {', '.join(paths)} (eval_examples takes max_examples)")
        return source_class(paths[split], fields=(inputs_key, targets_key))

    return register(Task(name, source_fn, text_to_text_preprocessors(prefix, inputs_key, targets_key),
                         metrics=metrics, splits=tuple(paths), objective="text_to_text",
                         description=f"{fmt.upper()} files {dict(paths)}"), replace=True)


# --- Shipped tasks: offline, on the shipped corpora ------------------------------------------------


def _bible(split):
    return sources.shipped("bible", split)


def _bible_en_es(split):
    return Documents(_bible(split), ["en_web", "es_rv1909"])


def _define_inputs(example, rng):
    """'define: bank (noun)', plus the first usage example when there is one, so the sense is known."""
    examples = [e for e in example.get("examples") or () if e]
    context = f", as in: {examples[0]}" if examples else ""
    return {"inputs": f"define: {example['word']} ({example['pos']}){context}",
            "targets": example["definition"]}


def _wordnet_define_preprocessors(vocab, feature_lengths):
    return [_define_inputs, *text_to_text_preprocessors()(vocab, feature_lengths)]


# The six parts of the Protestant canon and their books, as the shipped corpus names them.
BIBLE_SECTIONS = {
    "law": ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"),
    "history": ("Joshua", "Judges", "Ruth", "I Samuel", "II Samuel", "I Kings", "II Kings", "I Chronicles",
                "II Chronicles", "Ezra", "Nehemiah", "Esther"),
    "poetry": ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"),
    "prophets": ("Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah",
                 "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi"),
    "gospels": ("Matthew", "Mark", "Luke", "John", "Acts"),
    "letters": ("Romans", "I Corinthians", "II Corinthians", "Galatians", "Ephesians", "Philippians",
                "Colossians", "I Thessalonians", "II Thessalonians", "I Timothy", "II Timothy", "Titus",
                "Philemon", "Hebrews", "James", "I Peter", "II Peter", "I John", "II John", "III John", "Jude",
                "Revelation of John"),
}
SECTION_OF_BOOK = {book: section for section, books in BIBLE_SECTIONS.items() for book in books}


def _section_inputs(example, rng):
    """'which part of the Bible: <WEB verse>' -> law / history / poetry / prophets / gospels / letters."""
    return {"inputs": f"which part of the Bible: {example['en_web']}",
            "targets": SECTION_OF_BOOK[example["book"]]}


def _section_preprocessors(vocab, feature_lengths):
    return [_section_inputs, *text_to_text_preprocessors()(vocab, feature_lengths)]


def _register_shipped():
    span = span_corruption_preprocessors("text")
    register(Task("bible_span_corruption_en", lambda s: Documents(_bible(s), ["en_web"]), span,
                  objective="span_corruption", description="T5 span corruption of WEB verses"))
    register(Task("bible_span_corruption_en_es", _bible_en_es, span, objective="span_corruption",
                  description="T5 span corruption of WEB (English) and RV1909 (Spanish) verses"))
    register(Task("bible_ul2_en_es", _bible_en_es, ul2_preprocessors("text"), objective="ul2",
                  description="UL2's seven denoisers, uniform, on WEB and RV1909 verses"))
    register(Task("bible_ul2r_en_es", _bible_en_es, ul2_preprocessors("text", rates="ul2r"), objective="ul2",
                  description="UL2's denoisers at the UL2R rates (50% S, 25% R, 25% X) on WEB and RV1909"))
    register(Task("bible_clm_en_es", _bible_en_es, causal_lm_preprocessors("text"), objective="causal_lm",
                  description="causal LM (DecoderOnly) of WEB and RV1909 verses"))
    register(Task("bible_prefix_lm_en_es", _bible_en_es, prefix_lm_preprocessors("text"), objective="prefix_lm",
                  description="prefix LM, a random pivot per chunk, of WEB and RV1909 verses"))
    register(Task("bible_infill_en_es", _bible_en_es, text_infilling_preprocessors("text"), objective="text_infilling",
                  description="BART-style text infilling (the whole verse text is the target) of WEB and RV1909"))
    register(Task("bible_translate_en_es", _bible,
                  text_to_text_preprocessors("translate English to Spanish: ", "en_web", "es_rv1909"),
                  metrics=("bleu", "chrf"), description="WEB verse -> RV1909 verse"))
    register(Task("bible_modernize_kjv_web", _bible,
                  text_to_text_preprocessors("modernize: ", "en_kjv", "en_web"),
                  metrics=("bleu", "chrf"), description="KJV verse -> WEB verse"))
    register(Task("bible_section", _bible, _section_preprocessors, metrics=("accuracy",),
                  description="WEB verse -> the part of the Bible it is from (law, history, poetry, "
                              "prophets, gospels, letters)"))
    register(Task("wordnet_define", lambda s: sources.shipped("wordnet", s),
                  _wordnet_define_preprocessors, metrics=("bleu", "rouge", "exact_match"),
                  description="WordNet word (pos, usage example) -> its definition"))
    register(Mixture("bible_en_es_mix", (("bible_span_corruption_en_es", 1.0),
                                         ("bible_translate_en_es", 1.0))))


def _register_tfds_recipes():
    """T5's public recipes on TFDS datasets the user prepares (ArrayRecord; see README 'Real datasets').

    Registering reads nothing: the dataset is opened when a pipeline is built, and an
    unprepared one fails then with the `tfds build` command that prepares it.
    """
    register(Task("c4_span_corruption", lambda s: sources.TfdsSource("c4/en:3.1.0", s),
                  span_corruption_preprocessors("text"), splits=("train", "validation"),
                  objective="span_corruption", description="T5 span corruption of C4 (c4/en)"))
    register(Task("wmt14_translate_en_de", lambda s: sources.TfdsSource("wmt14_translate/de-en", s),
                  text_to_text_preprocessors("translate English to German: ", "en", "de"),
                  metrics=("bleu", "chrf"), description="WMT14 English -> German"))
    register(Task("c4_ul2", lambda s: sources.TfdsSource("c4/en:3.1.0", s), ul2_preprocessors("text"),
                  splits=("train", "validation"), objective="ul2", description="UL2 of C4 (c4/en)"))


_register_shipped()
_register_tfds_recipes()



# The shipped instruction tasks register themselves on the registry above (instructions.py builds on
# task_registry.py, not on this module).
from t5lite.data import instructions  # noqa: E402,F401

__all__ = [
    "SPLITS", "VOCAB_PATH", "Documents", "FeatureLengths", "Mixture", "PreprocessorsFn", "Task",
    "causal_lm_preprocessors", "default_vocabulary", "examples_proportional_mixture", "get", "names",
    "prefix_lm_preprocessors", "register", "register_mixture", "span_corruption_feature_lengths",
    "span_corruption_preprocessors", "text_to_text_preprocessors", "ul2_feature_lengths", "ul2_preprocessors",
    "objective_task", "ul2_task", "train_subset_task", "subset_indices", "Subset", "text_to_text_task",
]
