"""Tasks and mixtures: what they are and the one registry that names them.

A Task turns a split of its source into training batches (through pipeline.make_pipeline) and
into raw examples for decoding-based evaluation; a Mixture mixes tasks' example streams at fixed
rates before packing. Both live in one registry so gin files and the CLI can name them
(`get('wordnet_define')`). The catalog of shipped tasks is tasks.py (with instructions.py); this
module knows none of them, so both can build on it without importing each other.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from t5lite import metrics  # noqa: F401  (registers the metrics tasks name)
from t5lite import registry
from t5lite.data import objectives
from t5lite.data import pipeline
from t5lite.data import preprocessors as P
from t5lite.data.vocab import Vocabulary
from t5lite.errors import UserError
from t5lite.registry import register

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora", "spiece.model")
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


# --- Objectives: registered recipe makers, fn(text_key, **options) -> PreprocessorsFn --------------
# A recipe is fn(vocab, feature_lengths) -> the preprocessor list for pipeline.make_pipeline; an
# objective of the user's own is one more `@register("objective", name)` (tasks.objective_task uses it).


@register("objective", "text_to_text")
def text_to_text_preprocessors(prefix: str = "", inputs_key: str = "inputs",
                               targets_key: str = "targets") -> PreprocessorsFn:
    """prefix + record[inputs_key] -> record[targets_key], tokenized, trimmed so EOS survives."""
    def build(vocab, feature_lengths):
        return [lambda ex, rng: P.text_to_text(ex, prefix, inputs_key, targets_key),
                lambda ex, rng: P.tokenize(ex, vocab),
                lambda ex, rng: P.append_eos(ex, vocab.eos_id, lengths=feature_lengths)]
    return build


@register("objective", "span_corruption")
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


@register("objective", "ul2")
def ul2_preprocessors(text_key: str = "text", **options) -> PreprocessorsFn:
    """UL2's mixture of denoisers of `text_key`; options as objectives.ul2_preprocessors
    (denoisers, rates: 'uniform' | 'ul2r' | ..., mode_tokens, raw_length)."""
    return lambda vocab, feature_lengths: objectives.ul2_preprocessors(vocab, feature_lengths,
                                                                       text_key=text_key, **options)


@register("objective", "causal_lm")
def causal_lm_preprocessors(text_key: str = "text") -> PreprocessorsFn:
    """Causal LM of `text_key` for DecoderOnly (objectives.causal_lm_preprocessors)."""
    return lambda vocab, feature_lengths: objectives.causal_lm_preprocessors(vocab, feature_lengths,
                                                                             text_key=text_key)


@register("objective", "prefix_lm")
def prefix_lm_preprocessors(text_key: str = "text", noise_density: float = 0.5) -> PreprocessorsFn:
    """Prefix LM of `text_key`, a random pivot per chunk (objectives.prefix_lm_preprocessors)."""
    return lambda vocab, feature_lengths: objectives.prefix_lm_preprocessors(
        vocab, feature_lengths, text_key=text_key, noise_density=noise_density)


@register("objective", "text_infilling")
def text_infilling_preprocessors(text_key: str = "text", noise_density: float = 0.3) -> PreprocessorsFn:
    """BART-style text infilling of `text_key`: the whole text is the target (objectives.text_infilling_preprocessors)."""
    return lambda vocab, feature_lengths: objectives.text_infilling_preprocessors(
        vocab, feature_lengths, text_key=text_key, noise_density=noise_density)


# --- Task and Mixture ------------------------------------------------------------------------------


def _check_metrics(name: str, metric_names: Sequence[str]) -> tuple[str, ...]:
    metric_names = (metric_names,) if isinstance(metric_names, str) else tuple(metric_names)
    unknown = [m for m in metric_names if m not in registry.names("metric")]
    if unknown:
        raise UserError(f"task {name!r}: unknown metric(s) {', '.join(unknown)}: use names from "
                        f"{', '.join(registry.names('metric'))} (or register your own: t5lite.registry.register("
                        "'metric', name))")
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
        if self.objective not in registry.names("objective"):
            raise UserError(f"task {self.name!r}: objective {self.objective!r} is not one of "
                            f"{', '.join(registry.names('objective'))}: pick one (or register your own: "
                            "t5lite.registry.register('objective', name))")
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
