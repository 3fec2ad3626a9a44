"""Sequence-level knowledge distillation (Kim & Rush 2016): a teacher's decoded outputs as a task.

`make_distillation_data` decodes the inputs of a task split with the teacher once (greedy or beam
search: deterministic), writes one line per input, in the split's order, and registers a
text-to-text task over the file (tasks.text_to_text_task) that a student then trains on. The
inputs are written as the model read them (the task's prefix included), so the task over the
file adds no prefix and the student sees exactly what the teacher read.

    JSONL: {"inputs": ..., "targets": <teacher output>, "score": <teacher log-prob score>}
    TSV:   inputs<TAB>targets
"""

import json
import logging
import os
from typing import Dict, List, Optional

from t5lite.data import tasks as tasks_lib
from t5lite.errors import UserError
from t5lite.fileio import write_lines
from t5lite.infer.evaluate import decode_task_split

FORMATS = {".jsonl": "jsonl", ".tsv": "tsv"}

log = logging.getLogger(__name__)


def data_format(path: str) -> str:
    """'jsonl' or 'tsv' from the file name's extension."""
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise UserError(f"--out {path}: name a .jsonl or .tsv file (the extension picks the format)")
    return fmt


def teacher_pairs(config, params, vocab, task, split: str, *, max_examples: Optional[int] = None,
                  batch_size: int = 32, input_length: int = 128, max_decode_length: int = 64, strict: bool = False,
                  decoder_only: bool = False, progress=None, **decode_kwargs) -> List[Dict]:
    """[{'inputs', 'targets' (the teacher's output), 'score'}] for the examples of `split`, in order."""
    examples, _, tokens, scores = decode_task_split(
        config, params, task, vocab, split=split, max_examples=max_examples, batch_size=batch_size,
        input_length=input_length, max_decode_length=max_decode_length, strict=strict, decoder_only=decoder_only,
        progress=progress, **decode_kwargs)
    return [dict(inputs=ex["inputs_pretokenized"], targets=vocab.decode(row), score=float(score))
            for ex, row, score in zip(examples, tokens, scores)]


def _lines(pairs: List[Dict], fmt: str) -> List[str]:
    if fmt == "jsonl":
        return [json.dumps(pair, ensure_ascii=False) for pair in pairs]
    for number, pair in enumerate(pairs, 1):
        for key in ("inputs", "targets"):
            if any(c in pair[key] for c in "\t\n\r"):
                raise UserError(f"example {number}'s {key} holds a tab or line break, which TSV cannot hold; "
                                "write a .jsonl file instead")
    return [f"{pair['inputs']}\t{pair['targets']}" for pair in pairs]


def write_pairs(pairs: List[Dict], path: str) -> None:
    """One line per pair, written to a temporary name and renamed: never half a file."""
    write_lines(path, (line + "\n" for line in _lines(pairs, data_format(path))))


def distilled_task(name: str, split: str, path: str, metrics=("bleu",)) -> "tasks_lib.Task":
    """Registers (or replaces) the text-to-text task over a file written by write_pairs."""
    return tasks_lib.text_to_text_task(name, {split: os.path.abspath(path)}, format=data_format(path),
                                       metrics=metrics)


def make_distillation_data(config, params, vocab, task, split: str, out: str, *, name: Optional[str] = None,
                           **decode_options) -> "tasks_lib.Task":
    """Decodes `split` of `task` with the teacher (config, params), writes the pairs to `out` (.jsonl or
    .tsv) and returns the registered task `name` (default '<task>_distilled') whose `split` reads them.
    decode_options: as teacher_pairs (max_examples, batch_size, input_length, max_decode_length,
    method='greedy' | 'beam', num_beams, ...)."""
    data_format(out)  # a bad file name fails before decoding
    task = tasks_lib.get(task)
    pairs = teacher_pairs(config, params, vocab, task, split, **decode_options)
    write_pairs(pairs, out)
    log.info("wrote %d (input, teacher output) pairs to %s", len(pairs), out)
    return distilled_task(name or f"{task.name}_distilled", split.split("[")[0], out, task.metrics or ("bleu",))


def gin_lines(name: str, split: str, path: str) -> str:
    """The gin lines that train a student, in another process, on the task make_distillation_data registered."""
    return "\n".join([
        "MIXTURE_OR_TASK_NAME = @distilled/text_to_text_task()",
        f"distilled/text_to_text_task.name = {name!r}",
        f"distilled/text_to_text_task.paths = {{{split!r}: {os.path.abspath(path)!r}}}",
        f"distilled/text_to_text_task.format = {data_format(path)!r}",
    ])
