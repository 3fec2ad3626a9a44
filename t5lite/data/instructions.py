"""Instruction tuning (FLAN: Wei et al. 2021; Chung et al. 2022): tasks rendered through templates.

A template is data: an (inputs, targets) pair of format strings over a record's fields, e.g.
("Translate to Spanish: {english}", "{spanish}"). Each example draws one of its task's templates
from its rng; with probability `few_shot_rate` it is few-shot: up to `num_shots` exemplars drawn
from the train split (never the example itself), rendered with the same template, precede it,
as many as fit the inputs length. Tasks with answer options render them as `{options}` (FLAN's
"OPTIONS:" list), appended when a template does not place them.

Shipped, for every name in TEMPLATES: `instruct_<name>` (training: templates mixed, 25 % 3-shot),
`instruct_<name>_zero_shot` and `instruct_<name>_few_shot` (3-shot), for evaluation.
`instruction_mixture()` mixes the training forms examples-proportionally with a cap, leaving out
the HELD_OUT tasks (all their forms); `instruction_jsonl_task` reads the user's
{"instruction", "input", "output"} lines.
"""

from __future__ import annotations

import functools
import string
from typing import Callable, Mapping, Sequence

import numpy as np

from t5lite.data import sources
from t5lite.data import task_registry as tasks_lib
from t5lite.errors import UserError

Template = tuple[str, str]  # (inputs format, targets format)
EXEMPLAR_SEPARATOR = "\n\n"  # between few-shot exemplars, and between an exemplar's inputs and targets: "\n"

TEMPLATES: dict[str, list[Template]] = {
    "translate_en_es": [
        ("Translate to Spanish: {english}", "{spanish}"),
        ("{english}\n\nHow would you say this in Spanish?", "{spanish}"),
        ("Translate this English verse into Spanish.\n\nEnglish: {english}\nSpanish:", "{spanish}"),
        ('What is the Spanish for “{english}”?', "{spanish}")],
    "translate_es_en": [
        ("Translate to English: {spanish}", "{english}"),
        ("{spanish}\n\nWhat does this mean in English?", "{english}"),
        ("Translate this Spanish verse into English.\n\nSpanish: {spanish}\nEnglish:", "{english}")],
    "modernize_kjv_web": [
        ("Rewrite in modern English: {old}", "{modern}"),
        ("{old}\n\nSay this the way people speak today.", "{modern}"),
        ('This verse is from the King James Bible: “{old}” Write it in plain modern English.', "{modern}")],
    "archaize_web_kjv": [
        ("Rewrite in the English of the King James Bible: {modern}", "{old}"),
        ("{modern}\n\nHow would the King James Version put this?", "{old}"),
        ("Make this verse sound old-fashioned, like the 1611 Bible: {modern}", "{old}")],
    "define_word": [
        ('Define the {pos} “{word}”.', "{definition}"),
        ("What does the {pos} {word} mean?", "{definition}"),
        ("{word} ({pos})\n\nGive a dictionary definition.", "{definition}")],
    "name_the_word": [
        ('Which {pos} means “{definition}”?', "{word}"),
        ("Name the word: {definition} ({pos})", "{word}"),
        ("Definition: {definition}\n\nWhat {pos} is being defined?", "{word}")],
    "word_pos": [
        ('What part of speech is “{word}” in the sense “{definition}”?\n\n{options}', "{pos}"),
        ("{word}: {definition}\n\nIs this word a noun, a verb, an adjective or an adverb?\n\n{options}", "{pos}"),
        ("Word: {word}\nMeaning: {definition}\nPart of speech?", "{pos}")],
    "continue_verse": [
        ("Continue the verse: {start}", "{rest}"),
        ("{start} ...\n\nHow does this verse go on?", "{rest}"),
        ('Complete the text: “{start}”', "{rest}")],
    "identify_language": [
        ("Which language is this? {text}\n\n{options}", "{language}"),
        ("{text}\n\nWhat language is this text written in?\n\n{options}", "{language}"),
        ("Identify the language of the following verse.\n\n{text}", "{language}")],
    "old_or_modern": [
        ("Is this English old (like the King James Bible) or modern? {text}\n\n{options}", "{era}"),
        ("{text}\n\nIs this verse in old or modern English?\n\n{options}", "{era}"),
        ("Old or modern English?\n\n{text}", "{era}")],
}
HELD_OUT = ("instruct_archaize_web_kjv", "instruct_identify_language", "instruct_name_the_word")
FEW_SHOT_RATE, NUM_SHOTS = 0.25, 3  # the training forms: a quarter of the examples are 3-shot
_FORMS: dict[str, str] = {}  # registered task name -> the name of its training form (its family)


def template_fields(template: Template) -> set[str]:
    """The field names a template's inputs and targets use."""
    return {name for part in template for _, name, _, _ in string.Formatter().parse(part) if name}


def _render(template: Template, fields: Mapping[str, str], task_name: str) -> tuple[str, str]:
    try:
        return template[0].format_map(fields), template[1].format_map(fields)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"task {task_name!r}: template {template!r} cannot be filled from the fields "
                        f"{sorted(fields)} ({e!r}): fix the template or the task's fields") from None


def _options_text(options: Sequence[str]) -> str:
    return "OPTIONS:\n" + "\n".join(f"- {option}" for option in options)


def _exemplars(source, fields_fn: Callable, fields: Mapping[str, str], k: int,
               rng: np.random.Generator) -> list[dict]:
    """Up to k distinct records of `source` (as fields), drawn with `rng`, none equal to `fields`."""
    chosen, seen, n = [], set(), len(source)
    for _ in range(8 * k + 16):  # bounded: a tiny source may have fewer than k others
        if len(chosen) == k or len(seen) == n:
            break
        index = int(rng.integers(n))
        if index in seen:
            continue
        seen.add(index)
        candidate = fields_fn(source[index])
        if candidate != fields:
            chosen.append(candidate)
    return chosen


def render_instruction(example: dict, rng: np.random.Generator, *, name: str, templates: Sequence[Template],
                       fields_fn: Callable, options: Sequence[str] = (), num_shots: int = 0,
                       few_shot_rate: float = 0.0, exemplar_source: Callable | None = None,
                       fits: Callable[[str], bool] | None = None) -> dict:
    """A record -> {'inputs', 'targets'} text: a template from `rng`, zero- or few-shot."""
    fields = fields_fn(example)
    extra = {"options": _options_text(options)} if options else {}
    template = templates[int(rng.integers(len(templates)))]
    if options and "options" not in template_fields(template):
        template = (template[0] + "\n\n{options}", template[1])
    query_inputs, targets = _render(template, {**fields, **extra}, name)
    shots = []
    if num_shots and rng.random() < few_shot_rate:
        for shot in _exemplars(exemplar_source(), fields_fn, fields, num_shots, rng):
            shot_inputs, shot_targets = _render(template, {**shot, **extra}, name)
            shots.append(f"{shot_inputs}\n{shot_targets}")
    while True:  # drop exemplars from the front until the inputs fit
        inputs = EXEMPLAR_SEPARATOR.join([*shots, query_inputs])
        if not shots or fits is None or fits(inputs):
            break
        shots = shots[1:]
    return {"inputs": inputs, "targets": targets, "num_shots": len(shots)}


def instruction_task(name: str, source_fn: Callable[[str], object], templates: Sequence[Template], *,
                     fields_fn: Callable = dict, metrics: Sequence[str] = (), options: Sequence[str] = (),
                     num_shots: int = 0, few_shot_rate: float = 0.0, splits: Sequence[str] = tasks_lib.SPLITS,
                     exemplar_split: str = "train", family: str | None = None,
                     description: str = "") -> tasks_lib.Task:
    """Register (or replace) a task that renders `source_fn(split)` records through `templates`.

    fields_fn(record) -> {field: text} feeds the templates; few-shot exemplars come from
    `exemplar_split`. `family` names the training form this task is a variant of (held-out
    checks cover the whole family).
    """
    templates = [tuple(t) for t in templates]
    if not templates or any(len(t) != 2 or not all(isinstance(p, str) for p in t) for t in templates):
        raise UserError(f"task {name!r}: templates must be a non-empty list of (inputs, targets) format strings")
    if not 0.0 <= few_shot_rate <= 1.0 or num_shots < 0:
        raise UserError(f"task {name!r}: few_shot_rate must be in [0, 1] and num_shots >= 0")
    if num_shots and few_shot_rate and exemplar_split not in splits:
        raise UserError(f"task {name!r}: few-shot exemplars come from split {exemplar_split!r}, which it lacks")
    exemplar_source = functools.lru_cache(maxsize=1)(lambda: source_fn(exemplar_split))

    def build(vocab, feature_lengths):
        limit = (feature_lengths or {}).get("inputs")
        fits = (lambda text: len(vocab.encode(text)) < limit) if limit else None  # < : room for EOS
        render = functools.partial(render_instruction, name=name, templates=templates, fields_fn=fields_fn,
                                   options=tuple(options), num_shots=num_shots, few_shot_rate=few_shot_rate,
                                   exemplar_source=exemplar_source, fits=fits)
        return [render, *tasks_lib.text_to_text_preprocessors()(vocab, feature_lengths)]

    _FORMS[name] = family or name
    task = tasks_lib.Task(name, source_fn, build, metrics=metrics, splits=tuple(splits),
                          description=description or f"instructions over {len(templates)} templates")
    return tasks_lib.register(task, replace=True)


def instruction_mixture(name: str = "instruct_mix", tasks: Sequence[str] | None = None,
                        held_out: Sequence[str] = HELD_OUT, cap: int | None = 30_000) -> tasks_lib.Mixture:
    """Register (or replace) the examples-proportional (cap K) mixture of the training forms of
    `tasks` (default: every shipped one) without `held_out` nor any variant of them."""
    names = list(tasks) if tasks is not None else [f"instruct_{key}" for key in TEMPLATES]
    families = {_FORMS.get(tasks_lib.get(n).name, n) for n in held_out}
    return tasks_lib.examples_proportional_mixture(
        name, [n for n in names if _FORMS.get(n, n) not in families],
        cap=cap, held_out=[n for n, family in _FORMS.items() if family in families])


# --- The user's JSONL instructions ----------------------------------------------------------------


def _jsonl_fields(record: dict) -> dict:
    """{"instruction", "input", "output"} (input optional) -> fields, plus 'prompt': the instruction,
    then the input after a blank line when there is one."""
    instruction, given = str(record["instruction"]), str(record.get("input") or "")
    prompt = f"{instruction}\n\n{given}" if given.strip() else instruction
    return {"instruction": instruction, "input": given, "output": str(record["output"]), "prompt": prompt}


def instruction_jsonl_task(name: str, paths: Mapping[str, str | Sequence[str]], metrics: Sequence[str] = ("rouge",),
                           templates: Sequence[Template] = (("{prompt}", "{output}"),), num_shots: int = 0,
                           few_shot_rate: float = 0.0) -> tasks_lib.Task:
    """Register (or replace) an instruction task from JSON lines {"instruction", "input", "output"}:
    {split: path or glob}; templates over instruction / input / output / prompt."""
    if not isinstance(paths, Mapping) or not paths:
        raise UserError(f"task {name!r}: paths must map split names to JSONL files, e.g. {{'train': 'data/train.jsonl'}}")
    for pattern in paths.values():
        sources.expand(pattern)  # a path or glob matching nothing fails now

    @functools.lru_cache(maxsize=None)
    def source_fn(split):
        if split not in paths:
            raise UserError(f"task {name!r} reads files: split {split!r} cannot be sliced; use one of {', '.join(paths)}")
        source = sources.JsonlSource(paths[split])
        for i in range(len(source)):
            missing = [f for f in ("instruction", "output") if f not in source[i]]
            if missing:
                raise UserError(f"{paths[split]}: record {i + 1} has no {', '.join(missing)}: every line needs "
                                '{"instruction", "output"} (and optionally "input")')
        return source

    return instruction_task(name, source_fn, templates, fields_fn=_jsonl_fields, metrics=metrics,
                            num_shots=num_shots, few_shot_rate=few_shot_rate, splits=tuple(paths),
                            description=f"JSONL instructions {dict(paths)}")


# --- Shipped instruction tasks on the shipped corpora ---------------------------------------------

_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
_LANGUAGE = {"en_web": "English", "es_rv1909": "Spanish"}
_ERA = {"en_kjv": "old", "en_web": "modern"}


def _halves(text: str) -> tuple[str, str]:
    words = text.split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def _bible(fields):
    return lambda split: tasks_lib.Documents(sources.shipped("bible", split), fields)


def _wordnet_fields(r: dict) -> dict:
    return {"word": r["word"], "pos": _POS.get(r["pos"], r["pos"]), "definition": r["definition"]}


# name -> (source_fn(split), fields_fn(record) -> template fields, metric names, answer options)
SHIPPED = {
    "translate_en_es": (lambda s: sources.shipped("bible", s),
                        lambda r: {"english": r["en_web"], "spanish": r["es_rv1909"]}, ("bleu", "chrf"), ()),
    "modernize_kjv_web": (lambda s: sources.shipped("bible", s),
                          lambda r: {"old": r["en_kjv"], "modern": r["en_web"]}, ("bleu", "chrf"), ()),
    "define_word": (lambda s: sources.shipped("wordnet", s), _wordnet_fields, ("rouge", "bleu"), ()),
    "word_pos": (lambda s: sources.shipped("wordnet", s), _wordnet_fields, ("accuracy",),
                 ("noun", "verb", "adjective", "adverb")),
    "continue_verse": (_bible(["en_web", "es_rv1909"]),
                       lambda r: dict(zip(("start", "rest"), _halves(r["text"]))), ("chrf", "rouge"), ()),
    "identify_language": (_bible(["en_web", "es_rv1909"]),
                          lambda r: {"text": r["text"], "language": _LANGUAGE[r["field"]]}, ("accuracy",),
                          ("English", "Spanish")),
    "old_or_modern": (_bible(["en_kjv", "en_web"]), lambda r: {"text": r["text"], "era": _ERA[r["field"]]},
                      ("accuracy",), ("old", "modern")),
}
SHIPPED["translate_es_en"] = SHIPPED["translate_en_es"]  # same fields, reversed templates
SHIPPED["archaize_web_kjv"] = SHIPPED["modernize_kjv_web"]
SHIPPED["name_the_word"] = (*SHIPPED["define_word"][:2], ("exact_match",), ())


def _register_shipped() -> None:
    for key, templates in TEMPLATES.items():
        source_fn, fields_fn, metrics, options = SHIPPED[key]
        base = f"instruct_{key}"
        for name, shots, rate, form in ((base, NUM_SHOTS, FEW_SHOT_RATE, "mixed zero- and few-shot"),
                                        (f"{base}_zero_shot", 0, 0.0, "zero-shot"),
                                        (f"{base}_few_shot", NUM_SHOTS, 1.0, f"{NUM_SHOTS}-shot")):
            instruction_task(name, source_fn, templates, fields_fn=fields_fn, metrics=metrics, options=options,
                             num_shots=shots, few_shot_rate=rate, family=base,
                             description=f"{key} instructions ({len(templates)} templates, {form})")


_register_shipped()
