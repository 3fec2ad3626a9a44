"""T5's preprocessors in NumPy: pure functions of one example dict (+ a numpy Generator).

Examples are dicts of 1-D int arrays or strings. The random ones take `rng`
(`numpy.random.Generator`), so the same seed gives the same output. Follows
t5.data.preprocessors (span_corruption, prefix_lm, select_random_chunk) and seqio
(tokenize, append_eos_after_trim); EOS is appended by `append_eos`, never inside an objective.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from t5lite.data.vocab import EOS_ID, NUM_SENTINELS
from t5lite.errors import UserError

Example = Mapping[str, Any]


def _field(example: Example, key: str, what: str) -> Any:
    """example[key], or a UserError naming the fields the example does have."""
    if key not in example:
        raise UserError(f"{what}: example has no field {key!r} (it has {sorted(example)}): "
                        "name the source's field in the task's preprocessor arguments")
    return example[key]


# --- Span corruption (T5's pretraining objective) ---------------------------------------------


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float,
                  round_spans=np.round, max_spans: int | None = None) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) for `length` tokens (length >= 2), as T5 computes them.

    `round_spans` turns num_noise / mean_noise_span_length into a count (T5: nearest; UL2 here:
    stochastic, see random_spans_noise_mask); `max_spans` caps it (e.g. at the sentinel count).
    """
    num_noise = int(np.round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)  # at least one noise and one non-noise token
    num_spans = max(int(round_spans(num_noise / mean_noise_span_length)), 1)
    # T5 fails when a count cannot be split into that many non-empty spans; clamp instead.
    num_spans = min(num_spans, num_noise, length - num_noise, max_spans or length)
    return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split `num_items` into `num_segments` positive lengths, uniformly over all such splits."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1  # [S-1]
    return np.diff(np.concatenate([[0], cuts, [num_items]]))  # [S]


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator, *, unbiased_span_count: bool = False,
                            max_spans: int | None = None) -> np.ndarray:
    """Bool mask [length]: alternating non-noise / noise spans, starting with non-noise.

    About `noise_density * length` noise tokens in spans of mean length
    `mean_noise_span_length`, as t5.data.preprocessors.random_spans_noise_mask. T5 rounds the
    span count to the nearest integer, so a 64-token mean on 568 tokens makes one 85-token span;
    `unbiased_span_count` rounds it up with probability equal to the fraction instead, so spans
    average the mean over many examples. `max_spans` caps the count (at most that many sentinels).
    """
    orig_length, length = length, max(length, 2)  # lengths 0 and 1: build for 2, then cut
    round_spans = (lambda x: np.floor(x) + (rng.random() < x - np.floor(x))) if unbiased_span_count else np.round
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length, round_spans, max_spans)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)  # [S]
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)  # [S]
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # [2S]
    span_index = np.repeat(np.arange(2 * num_spans), interleaved)  # [length]
    return (span_index % 2 == 1)[:orig_length]


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw_tokens_length, targets_length) so span corruption fills `inputs_length` exactly.

    T5's random_spans_helper: the longest raw chunk whose corrupted inputs (+ one EOS) fit;
    targets count one EOS too. 512 -> (568, 114).
    """
    if inputs_length < 3:
        raise UserError(f"span corruption needs inputs_length >= 3, got {inputs_length}: raise it")

    def lengths(tokens_length):
        num_noise, num_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    targets_length = lengths(tokens_length)[1]
    # T5: with density 0.5 prefer targets no longer than inputs (often a round number). T5
    # decrements targets_length; recomputing it is exact when the span count changes too.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length = lengths(tokens_length)[1]
    return tokens_length, targets_length


def _sentinels_for_spans(noise_mask: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-span starts [L] and each position's span sentinel [L]: vocab_size-1, -2, ..."""
    prev_is_noise = np.zeros_like(noise_mask)
    prev_is_noise[1:] = noise_mask[:-1]
    span_start = noise_mask & ~prev_is_noise
    return span_start, vocab_size - np.cumsum(span_start)


def span_corruption(example: Example, rng: np.random.Generator, *, vocab_size: int,
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                    input_feature: str = "targets", num_sentinels: int = NUM_SENTINELS,
                    unbiased_span_count: bool = False, cap_spans: bool = False) -> dict:
    """T5's span corruption of `example[input_feature]` into {'inputs', 'targets'} (int32).

    inputs: the non-noise tokens, each noise span replaced by one sentinel; targets: each
    noise span preceded by its sentinel. Sentinels count down from vocab_size - 1. More spans
    than sentinels is an error, or with `cap_spans` fewer, longer spans (see random_spans_noise_mask).
    """
    tokens = np.asarray(_field(example, input_feature, "span_corruption"), np.int32).reshape(-1)  # [L]
    noise = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng,
                                    unbiased_span_count=unbiased_span_count,
                                    max_spans=num_sentinels if cap_spans else None)  # [L]
    span_start, sentinel = _sentinels_for_spans(noise, vocab_size)  # [L], [L]
    num_spans = int(span_start.sum())
    if num_spans > num_sentinels:
        raise UserError(f"span corruption of {len(tokens)} tokens makes {num_spans} noise spans but the "
                        f"vocabulary has {num_sentinels} sentinels: use shorter inputs or a longer "
                        "mean_noise_span_length")
    # inputs: first token of each noise span -> its sentinel; drop the rest of the span.
    inputs = np.where(span_start, sentinel, tokens)[~noise | span_start]  # [L - noise + spans]
    # targets: the noise tokens with each span's sentinel inserted before it.
    starts_in_noise = np.cumsum(noise)[span_start] - 1  # [spans] index of each start among noise
    targets = np.insert(tokens[noise], starts_in_noise, sentinel[span_start])  # [noise + spans]
    return {**example, "inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)}


def text_infilling(example: Example, rng: np.random.Generator, *, vocab_size: int,
                   noise_density: float = 0.3, mean_noise_span_length: float = 3.0,
                   input_feature: str = "targets", num_sentinels: int = NUM_SENTINELS) -> dict:
    """BART's text infilling (Lewis et al. 2020, with T5's span sampler): inputs are the tokens with each
    noise span replaced by one sentinel, as span_corruption's; targets are the WHOLE uncorrupted tokens, so
    the decoder learns to reproduce its input and fill the gaps (a copy skill span corruption never asks
    for: its targets are the gaps alone)."""
    tokens = np.asarray(_field(example, input_feature, "text_infilling"), np.int32).reshape(-1)  # [L]
    corrupted = span_corruption({input_feature: tokens}, rng, vocab_size=vocab_size, noise_density=noise_density,
                                mean_noise_span_length=mean_noise_span_length, input_feature=input_feature,
                                num_sentinels=num_sentinels, cap_spans=True)
    return {**example, "inputs": corrupted["inputs"], "targets": tokens}


# --- Prefix LM and chunking --------------------------------------------------------------------


def prefix_lm(example: Example, rng: np.random.Generator, *, noise_density: float = 0.5,
              input_feature: str = "targets") -> dict:
    """T5's prefix LM: cut the tokens at a random point; the prefix is the input, the rest the target.

    As T5's random_prefix_noise_mask, the prefix keeps between max(1, round((1 - 2 d)(L - 1)))
    and L - 1 tokens, d = noise_density <= 0.5 (0.5: any cut that leaves both sides non-empty).
    """
    if not 0.0 < noise_density <= 0.5:
        raise UserError(f"prefix_lm noise_density must be in (0, 0.5], got {noise_density}: change it")
    tokens = np.asarray(_field(example, input_feature, "prefix_lm"), np.int32).reshape(-1)  # [L]
    max_inputs = len(tokens) - 1
    if max_inputs <= 0:  # 0 or 1 tokens: all of it is target, as T5
        cut = 0
    else:
        min_inputs = min(max_inputs, max(1, int(np.round((1 - 2 * noise_density) * max_inputs))))
        cut = int(rng.integers(min_inputs, max_inputs + 1))
    return {**example, "inputs": tokens[:cut], "targets": tokens[cut:]}


def select_random_chunk(tokens: Sequence[int] | np.ndarray, rng: np.random.Generator,
                        max_length: int) -> np.ndarray:
    """One random `max_length`-aligned chunk of a document, as T5's select_random_chunk.

    The document is cut into ceil(L / max_length) segments and one is picked uniformly,
    so a document is seen in pieces rather than always from its start.
    """
    if max_length <= 0:
        raise UserError(f"select_random_chunk max_length must be positive, got {max_length}")
    tokens = np.asarray(tokens).reshape(-1)  # [L]
    num_segments = -(-len(tokens) // max_length)
    if num_segments <= 1:
        return tokens
    start = max_length * int(rng.integers(num_segments))
    return tokens[start:start + max_length]  # [<= max_length]


# --- Text, tokens, lengths ---------------------------------------------------------------------


def _as_text(value: Any) -> str | None:
    """str for str / bytes / numpy string scalars (as TFDS yields); None for anything else."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value) if isinstance(value, str) else None


def text_to_text(example: Example, prefix: str = "translate English to Spanish: ",
                 inputs_key: str = "inputs", targets_key: str = "targets") -> dict:
    """{'inputs': prefix + example[inputs_key], 'targets': example[targets_key]} as text.

    Any text-to-text task with a task prefix (translation, definitions, ...), like T5's
    translate. The source fields are replaced; other fields are kept.
    """
    inputs = _as_text(_field(example, inputs_key, "text_to_text"))
    targets = _as_text(_field(example, targets_key, "text_to_text"))
    if inputs is None or targets is None:
        raise UserError(f"text_to_text: fields {inputs_key!r} and {targets_key!r} must be text: "
                        "point inputs_key/targets_key at string fields")
    rest = {k: v for k, v in example.items() if k not in (inputs_key, targets_key)}
    return {**rest, "inputs": prefix + inputs, "targets": targets}


def tokenize(example: Example, vocab, keys: Sequence[str] = ("inputs", "targets"),
             copy_pretokenized: bool = True) -> dict:
    """Encode the text fields in `keys` with `vocab` to int32 ids (no EOS).

    Keys absent from the example are skipped (pretraining has only 'targets'); the text is
    kept as '<key>_pretokenized' for evaluation, as seqio does.
    """
    out = dict(example)
    present = [k for k in keys if k in example]
    if not present:
        raise UserError(f"tokenize: example has none of the fields {list(keys)} (it has "
                        f"{sorted(example)}): set the keys or add a text_to_text step first")
    for key in present:
        text = _as_text(example[key])
        if text is None:
            raise UserError(f"tokenize: field {key!r} is not text: tokenize it only once")
        out[key] = np.asarray(vocab.encode(text), dtype=np.int32)  # [L]
        if copy_pretokenized:
            out[f"{key}_pretokenized"] = text
    return out


def trim(example: Example, lengths: Mapping[str, int]) -> dict:
    """Cut each token field named in `lengths` to at most that many tokens."""
    out = dict(example)
    for key, n in lengths.items():
        if key in example:
            out[key] = np.asarray(example[key]).reshape(-1)[:n]
    return out


def append_eos(example: Example, eos_id: int = EOS_ID, keys: Sequence[str] = ("inputs", "targets"),
               lengths: Mapping[str, int] | None = None) -> dict:
    """Append EOS to each token field in `keys`.

    With `lengths`, a field is first cut to lengths[key] - 1 so EOS always survives
    (seqio's append_eos_after_trim).
    """
    out = dict(example)
    for key in keys:
        if key not in example:
            continue
        tokens = np.asarray(example[key], dtype=np.int32).reshape(-1)  # [L]
        if lengths is not None and key in lengths:
            tokens = tokens[:max(lengths[key] - 1, 0)]
        out[key] = np.concatenate([tokens, np.array([eos_id], np.int32)])  # [L + 1]
    return out
