"""Tasks and mixtures by name: a source, its preprocessors and the metrics that score it.

A Task turns a split of its source into training batches (through pipeline.make_pipeline) and
into raw examples for decoding-based evaluation; a Mixture mixes tasks' example streams at fixed
rates before packing. Both live in one registry so gin files and the CLI can name them
(`get('wordnet_define')`). The shipped tasks run offline on the shipped corpora and vocabulary.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from t5lite import metrics as metrics_lib
from t5lite.data import objectives
from t5lite.data import pipeline
from t5lite.data import preprocessors as P
from t5lite.data import sources
from t5lite.data.vocab import Vocabulary
from t5lite.errors import UserError

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora", "spiece.model")
OBJECTIVES = ("text_to_text", "span_corruption", "prefix_lm", "causal_lm", "ul2")
SPLITS = ("train", "validation", "test")

FeatureLengths = Mapping[str, int]
PreprocessorsFn = Callable[[Vocabulary, "FeatureLengths | None"], list]


@functools.lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    """The shipped 8,192-piece English/Spanish vocabulary (T5 layout), built by corpora/build_vocab.py."""
    return Vocabulary(VOCAB_PATH)


def span_corruption_feature_lengths(inputs_length: int) -> dict[str, int]:
    """{'inputs': L, 'targets': T}: the lengths T5's span corruption fills exactly (512 -> 114)."""
    return {"inputs": int(inputs_length), "targets": P.span_corruption_lengths(int(inputs_length))[1]}


def ul2_feature_lengths(inputs_length: int, denoisers: Sequence = objectives.UL2_DENOISERS,
                        vocab: Vocabulary | None = None) -> dict[str, int]:
    """{'inputs': L, 'targets': T}: the targets length UL2 needs when its chunks fill `inputs_length`
    (with the mode tokens of `vocab`, default the shipped one): 512 -> 339, 128 -> 83."""
    denoisers = [objectives.as_denoiser(d) for d in denoisers]
    vocab = vocab or default_vocabulary()
    modes = {k: len(vocab.encode(t)) for k, t in objectives.MODE_TOKENS.items()}
    raw = objectives.ul2_raw_length({"inputs": int(inputs_length), "targets": 1 << 30}, denoisers, modes)
    return {"inputs": int(inputs_length), "targets": objectives.ul2_feature_lengths(raw, denoisers, modes)["targets"]}


# --- Preprocessor recipes: fn(vocab, feature_lengths) -> list for pipeline.make_pipeline ---------


def text_to_text_preprocessors(prefix: str = "", inputs_key: str = "inputs",
                               targets_key: str = "targets") -> PreprocessorsFn:
    """prefix + record[inputs_key] -> record[targets_key], tokenized, trimmed so EOS survives."""
    def build(vocab, feature_lengths):
        return [lambda ex, rng: P.text_to_text(ex, prefix, inputs_key, targets_key),
                lambda ex, rng: P.tokenize(ex, vocab),
                lambda ex, rng: P.append_eos(ex, vocab.eos_id, lengths=feature_lengths)]
    return build


def span_corruption_preprocessors(text_key: str = "text") -> PreprocessorsFn:
    """T5's span corruption of `text_key` (pipeline.span_corruption_preprocessors), checking that
    feature_lengths leaves room for the targets it makes (see span_corruption_feature_lengths)."""
    def build(vocab, feature_lengths):
        if not feature_lengths or "inputs" not in feature_lengths:
            raise UserError(f"span corruption needs feature_lengths with an 'inputs' length, got "
                            f"{feature_lengths}: use e.g. {span_corruption_feature_lengths(512)}")
        wanted = span_corruption_feature_lengths(feature_lengths["inputs"])
        if feature_lengths.get("targets", wanted["targets"]) < wanted["targets"]:
            raise UserError(f"feature_lengths {dict(feature_lengths)} would cut span-corruption "
                            f"targets: set 'targets' to {wanted['targets']} for inputs "
                            f"{wanted['inputs']} (tasks.span_corruption_feature_lengths)")
        return pipeline.span_corruption_preprocessors(vocab, feature_lengths["inputs"],
                                                      text_key=text_key)
    return build


def ul2_preprocessors(text_key: str = "text", **options) -> PreprocessorsFn:
    """UL2's mixture of denoisers of `text_key`; options as objectives.ul2_preprocessors
    (denoisers, rates: 'uniform' | 'ul2r' | ..., mode_tokens, raw_length)."""
    return lambda vocab, feature_lengths: objectives.ul2_preprocessors(vocab, feature_lengths,
                                                                       text_key=text_key, **options)


def causal_lm_preprocessors(text_key: str = "text") -> PreprocessorsFn:
    """Causal LM of `text_key` for DecoderOnly (objectives.causal_lm_preprocessors)."""
    return lambda vocab, feature_lengths: objectives.causal_lm_preprocessors(vocab, feature_lengths,
                                                                             text_key=text_key)


def prefix_lm_preprocessors(text_key: str = "text", noise_density: float = 0.5) -> PreprocessorsFn:
    """Prefix LM of `text_key`, a random pivot per chunk (objectives.prefix_lm_preprocessors)."""
    return lambda vocab, feature_lengths: objectives.prefix_lm_preprocessors(
        vocab, feature_lengths, text_key=text_key, noise_density=noise_density)


# --- Task and Mixture ------------------------------------------------------------------------------


def _check_metrics(name: str, metric_names: Sequence[str]) -> tuple[str, ...]:
    metric_names = (metric_names,) if isinstance(metric_names, str) else tuple(metric_names)
    unknown = [m for m in metric_names if m not in metrics_lib.METRICS]
    if unknown:
        raise UserError(f"task {name!r}: unknown metric(s) {', '.join(unknown)}: use names from "
                        f"{', '.join(metrics_lib.METRICS)}")
    return metric_names


@dataclasses.dataclass(frozen=True)
class Task:
    """A named dataset: source_fn(split) -> random-access records, preprocessors_fn(vocab,
    feature_lengths) -> the pipeline's preprocessor list, and metric names for its predictions."""

    name: str
    source_fn: Callable[[str], Any] = dataclasses.field(repr=False)
    preprocessors_fn: PreprocessorsFn = dataclasses.field(repr=False)
    metrics: tuple[str, ...] = ()
    splits: tuple[str, ...] = SPLITS
    objective: str = "text_to_text"
    postprocess_fn: Callable[[str], str] = dataclasses.field(default=str.strip, repr=False)
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise UserError(f"task name {self.name!r} must be a non-empty string: name the task")
        if self.objective not in OBJECTIVES:
            raise UserError(f"task {self.name!r}: objective {self.objective!r} is not one of "
                            f"{', '.join(OBJECTIVES)}: pick one")
        splits = (self.splits,) if isinstance(self.splits, str) else tuple(self.splits)
        if not splits:
            raise UserError(f"task {self.name!r} has no splits: give at least one (e.g. 'train')")
        object.__setattr__(self, "splits", splits)
        object.__setattr__(self, "metrics", _check_metrics(self.name, self.metrics))

    def source(self, split: str):
        """The records of `split` (TFDS slices like 'validation[:10]' allowed where the source is TFDS)."""
        if split.split("[")[0] not in self.splits:
            raise UserError(f"task {self.name!r} has no split {split!r}: use one of "
                            f"{', '.join(self.splits)}")
        return self.source_fn(split)

    def num_examples(self, split: str = "train") -> int:
        """Records in `split`: the source's len (TFDS and file sources know it without reading)."""
        source = self.source(split)
        try:
            return len(source)
        except TypeError:
            raise UserError(f"the {split!r} source of task {self.name!r} has no len(): give the mixture "
                            "explicit rates instead of examples-proportional ones") from None

    def preprocessors(self, vocab: Vocabulary | None = None,
                      feature_lengths: FeatureLengths | None = None) -> list:
        return list(self.preprocessors_fn(vocab or default_vocabulary(), feature_lengths))

    def dataset(self, split: str, vocab: Vocabulary | None = None, *, feature_lengths: FeatureLengths,
                batch_size: int, seed: int = 0, **options) -> grain.IterDataset:
        """Batches of `split` as a grain IterDataset; options as pipeline.make_dataset (shuffle,
        num_epochs, pack, decoder_only, process_index, process_count, ...)."""
        return pipeline.make_dataset(self.source(split), self.preprocessors(vocab, feature_lengths),
                                     feature_lengths=feature_lengths, batch_size=batch_size,
                                     seed=seed, **options)

    def pipeline(self, split: str, vocab: Vocabulary | None = None, *,
                 feature_lengths: FeatureLengths, batch_size: int, seed: int = 0,
                 **options) -> grain.DatasetIterator:
        """A resumable iterator of this process's batches (`get_state` / `set_state`)."""
        return iter(self.dataset(split, vocab, feature_lengths=feature_lengths,
                                 batch_size=batch_size, seed=seed, **options))

    def eval_examples(self, split: str, vocab: Vocabulary | None = None,
                      max_examples: int | None = None,
                      feature_lengths: FeatureLengths | None = None) -> list[dict]:
        """The first `max_examples` examples of `split`, in order, preprocessed: 'inputs' / 'targets'
        (int32 ids ending in EOS, trimmed to feature_lengths if given) and the texts
        'inputs_pretokenized' / 'targets_pretokenized' that decoding-based evaluation scores."""
        steps = self.preprocessors(vocab, feature_lengths)
        if any(isinstance(step, pipeline.SplitTokens) for step in steps):
            raise UserError(f"task {self.name!r} ({self.objective}) has no per-example targets to "
                            f"decode: score it by loss on task.pipeline({split!r}, shuffle=False, "
                            "num_epochs=1) instead")
        source, out = self.source(split), []
        for i in range(len(source)):
            if max_examples is not None and len(out) >= max_examples:
                break
            example, rng = dict(source[i]), np.random.default_rng([0, i])
            for step in steps:
                example = step(example, rng)
                if example is None:
                    break
            if example is not None:
                out.append(example)
        return out

    def postprocess(self, decoded_text: str) -> str:
        """Model output text -> the string the metrics compare with 'targets_pretokenized'."""
        return self.postprocess_fn(decoded_text)


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Registered tasks (or mixtures) mixed at fixed rates before packing, e.g. pretraining
    plus a supervised task. Rates are relative weights; nested mixtures multiply out."""

    name: str
    tasks_and_weights: tuple[tuple[str, float], ...]

    def __post_init__(self):
        try:
            pairs = tuple((str(n), w) for n, w in (self.tasks_and_weights or ()))
        except (TypeError, ValueError):
            pairs = ()
        if not pairs:
            raise UserError(f"mixture {self.name!r}: tasks_and_weights {self.tasks_and_weights!r} "
                            "is not a non-empty list of (task_name, weight) pairs: give one")
        for task_name, weight in pairs:
            if not isinstance(weight, (int, float)) or not weight > 0 or not np.isfinite(weight):
                raise UserError(f"mixture {self.name!r}: weight {weight!r} of {task_name!r} must "
                                "be a positive number")
            get(task_name)  # unknown names fail now, with suggestions
        object.__setattr__(self, "tasks_and_weights", pairs)

    def weighted_tasks(self) -> list[tuple[Task, float]]:
        """[(Task, rate)] with rates summing to 1, nested mixtures flattened."""
        total = sum(w for _, w in self.tasks_and_weights)
        out = []
        for task_name, weight in self.tasks_and_weights:
            entry = get(task_name)
            parts = entry.weighted_tasks() if isinstance(entry, Mixture) else [(entry, 1.0)]
            out += [(task, rate * weight / total) for task, rate in parts]
        return out

    @property
    def tasks(self) -> list[Task]:
        return [task for task, _ in self.weighted_tasks()]

    @property
    def splits(self) -> tuple[str, ...]:
        """Splits every task has."""
        tasks = self.tasks
        return tuple(s for s in tasks[0].splits if all(s in t.splits for t in tasks[1:]))

    def dataset(self, split: str, vocab: Vocabulary | None = None, *,
                feature_lengths: FeatureLengths, batch_size: int, seed: int = 0,
                **options) -> grain.IterDataset:
        """Mixed batches of `split`; options as pipeline.make_mixture_dataset."""
        streams = [(task.source(split), task.preprocessors(vocab, feature_lengths), rate)
                   for task, rate in self.weighted_tasks()]
        return pipeline.make_mixture_dataset(streams, feature_lengths=feature_lengths,
                                             batch_size=batch_size, seed=seed, **options)

    def pipeline(self, split: str, vocab: Vocabulary | None = None, *,
                 feature_lengths: FeatureLengths, batch_size: int, seed: int = 0,
                 **options) -> grain.DatasetIterator:
        return iter(self.dataset(split, vocab, feature_lengths=feature_lengths,
                                 batch_size=batch_size, seed=seed, **options))


# --- The registry ---------------------------------------------------------------------------------

_REGISTRY: dict[str, Task | Mixture] = {}


def register(entry: Task | Mixture, replace: bool = False) -> Task | Mixture:
    """Add a task or mixture under its name; re-using a name needs replace=True."""
    if not isinstance(entry, (Task, Mixture)):
        raise UserError(f"register() takes a Task or Mixture, got {type(entry).__name__}")
    if entry.name in _REGISTRY and not replace:
        raise UserError(f"a task or mixture named {entry.name!r} is already registered: choose "
                        "another name (or pass replace=True)")
    _REGISTRY[entry.name] = entry
    return entry


def names() -> list[str]:
    """All registered task and mixture names, sorted."""
    return sorted(_REGISTRY)


def get(name: str | Task | Mixture) -> Task | Mixture:
    """The task or mixture registered as `name` (a Task or Mixture passes through)."""
    if isinstance(name, (Task, Mixture)):
        return name
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), names(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown task or mixture {name!r}: {hint}registered: {', '.join(names())} "
                        "(or register your own, e.g. with tasks.text_to_text_task)")
    return _REGISTRY[name]


def register_mixture(name: str, tasks_and_weights: Sequence[tuple[str, float]]) -> Mixture:
    """Register (or replace) and return a mixture: a plain function for gin files."""
    return register(Mixture(name, tuple(tuple(pair) for pair in tasks_and_weights)), replace=True)


def examples_proportional_mixture(name: str, tasks: Sequence[str], cap: int | None = None,
                                  held_out: Sequence[str] = (), split: str = "train") -> Mixture:
    """Register (or replace) a mixture of `tasks` minus `held_out` at rates proportional to
    min(examples in `split`, cap): T5 / FLAN's examples-proportional mixing with a cap K.

    Held-out tasks never enter it, also not through a nested mixture (that is an error).
    """
    if isinstance(tasks, str) or isinstance(held_out, str):
        raise UserError(f"mixture {name!r}: tasks and held_out are lists of task names, not one string")
    if cap is not None and (not isinstance(cap, (int, np.integer)) or cap <= 0):
        raise UserError(f"mixture {name!r}: cap {cap!r} must be a positive integer or None")

    def leaves(entry_name):
        entry = get(entry_name)
        return entry.tasks if isinstance(entry, Mixture) else [entry]

    held = {task.name for n in held_out for task in leaves(n)}  # unknown names fail with suggestions
    kept = [n for n in tasks if get(n).name not in held]
    if not kept:
        raise UserError(f"mixture {name!r}: every task is held out: keep at least one for training")
    weights = []
    for task_name in kept:
        leaked = held & {task.name for task in leaves(task_name)}
        if leaked:
            raise UserError(f"mixture {name!r}: {task_name!r} contains held-out task(s) {sorted(leaked)}: "
                            "list its tasks individually")
        size = sum(task.num_examples(split) for task in leaves(task_name))
        weights.append(min(size, cap) if cap else size)
    if not all(weights):
        empty = [n for n, w in zip(kept, weights) if not w]
        raise UserError(f"mixture {name!r}: task(s) {empty} have no {split!r} examples: drop them")
    return register_mixture(name, list(zip(kept, weights)))


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


class Documents:
    """Random-access {'text': ..., 'field': name} documents from chosen fields of each record: record i,
    field j is document i * len(fields) + j (so a Bible verse gives an English and a Spanish document)."""

    def __init__(self, source, fields: Sequence[str]):
        self._source, self._fields = source, tuple(fields)

    def __len__(self) -> int:
        return len(self._source) * len(self._fields)

    def __getitem__(self, index: int) -> dict:
        record, field = divmod(int(index), len(self._fields))
        return {"text": self._source[record][self._fields[field]], "field": self._fields[field]}


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
    register(Task("bible_translate_en_es", _bible,
                  text_to_text_preprocessors("translate English to Spanish: ", "en_web", "es_rv1909"),
                  metrics=("bleu", "chrf"), description="WEB verse -> RV1909 verse"))
    register(Task("bible_modernize_kjv_web", _bible,
                  text_to_text_preprocessors("modernize: ", "en_kjv", "en_web"),
                  metrics=("bleu", "chrf"), description="KJV verse -> WEB verse"))
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

# The shipped instruction tasks (instructions.py builds on Task and Mixture above).
from t5lite.data import instructions  # noqa: E402,F401

