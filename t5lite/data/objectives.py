"""Pretraining objectives beyond T5's span corruption: UL2's mixture of denoisers, causal LM, prefix LM.

Each is a preprocessor recipe `fn(vocab, feature_lengths, ...) -> list` for pipeline.make_pipeline
(tasks.py registers the shipped tasks). Each tokenizes documents, cuts the concatenated stream into
raw chunks with pipeline.split_tokens (an epoch sees every token once) and makes every random
choice from the chunk's rng, so it is deterministic and restores exactly with the iterator state.

UL2 (Tay et al. 2022, "Unifying Language Learning Paradigms"): every chunk gets one denoiser,
drawn at the mixing rates: R (regular span corruption), X (extreme: long spans or a high noise
rate) or S (prefix LM with a random pivot); the inputs start with the denoiser's mode token,
[NLU], [NLG] or [S2S], tokenized as ordinary text. The UL2R mix (Tay et al. 2022b, "Transcending
scaling laws with 0.1% extra compute") is the rate preset 'ul2r': 50 % S, 25 % R, 25 % X.

UL2 lengths. A raw chunk of C tokens, m mode-token tokens, n = round(r C) noise tokens in
s <= ceil(n / mu) spans (at most 100: the sentinels) give, EOS included,
    R / X (mu, r):  inputs = m + C - n + s + 1     targets = n + s + 1
    S (r):          inputs <= m + C                targets <= C - round((1 - 2r)(C - 1)) + 1
so high-rate X-denoisers need targets about as long as their inputs. One chunk length serves
all denoisers: the largest C at which every denoiser fits the task's feature lengths
(`ul2_raw_length`), so nothing is ever cut, and shorter examples are packed together. E.g. with
the default denoisers and mode tokens, inputs/targets 512/512 -> C = 506 and 128/128 -> C = 122.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Mapping, Sequence

import numpy as np

from t5lite.data import pipeline
from t5lite.data import preprocessors as P
from t5lite.errors import UserError

MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}
RATE_PRESETS = {"uniform": None, "ul2r": {"S": 0.5, "R": 0.25, "X": 0.25}}


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: kind 'R' / 'X' (span corruption: `noise_density` of the tokens in spans
    of mean `mean_noise_span_length`) or 'S' (prefix LM: on average `noise_density` of the chunk,
    after a random pivot, is the target)."""

    kind: str
    noise_density: float
    mean_noise_span_length: float | None = None

    def __post_init__(self):
        if self.kind not in MODE_TOKENS:
            raise UserError(f"denoiser kind {self.kind!r} is not one of R, X, S: fix the denoiser list")
        r = self.noise_density
        if not (0.0 < r <= 0.5 if self.kind == "S" else 0.0 < r < 1.0):
            bounds = "(0, 0.5]" if self.kind == "S" else "(0, 1)"
            raise UserError(f"{self}: noise_density must be in {bounds}: change it")
        if self.kind != "S" and not (self.mean_noise_span_length or 0) >= 1:
            raise UserError(f"{self}: an {self.kind}-denoiser needs mean_noise_span_length >= 1: set it")

    def __str__(self) -> str:
        if self.kind == "S":
            return f"S({self.noise_density:g})"
        return f"{self.kind}({self.mean_noise_span_length or 0:g}, {self.noise_density:g})"


# UL2's seven denoisers: R (mu 3 and 8, r 0.15), X ((3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5)), S (r 0.25).
UL2_DENOISERS = (Denoiser("R", 0.15, 3.0), Denoiser("R", 0.15, 8.0),
                 Denoiser("X", 0.5, 3.0), Denoiser("X", 0.5, 8.0),
                 Denoiser("X", 0.15, 64.0), Denoiser("X", 0.5, 64.0),
                 Denoiser("S", 0.25))


def as_denoiser(spec) -> Denoiser:
    """A Denoiser from itself or a gin-friendly tuple: ('R', 0.15, 3.0), ('X', 0.5, 64), ('S', 0.25)."""
    if isinstance(spec, Denoiser):
        return spec
    if isinstance(spec, (tuple, list)) and 2 <= len(spec) <= 3 and isinstance(spec[0], str):
        return Denoiser(spec[0], float(spec[1]), float(spec[2]) if len(spec) == 3 else None)
    raise UserError(f"denoiser {spec!r} is not (kind, noise_density[, mean_noise_span_length]), "
                    "e.g. ('X', 0.5, 64.0) or ('S', 0.25)")


def mixing_rates(denoisers: Sequence[Denoiser], rates="uniform") -> np.ndarray:
    """Probabilities [len(denoisers)] summing to 1, from 'uniform', 'ul2r', {kind: share} (split
    evenly among the denoisers of that kind) or one weight per denoiser."""
    if isinstance(rates, str):
        if rates not in RATE_PRESETS:
            raise UserError(f"UL2 rates {rates!r} is not a preset ({', '.join(RATE_PRESETS)}), a "
                            "{kind: share} dict or one weight per denoiser: fix it")
        rates = RATE_PRESETS[rates]
    kinds = [d.kind for d in denoisers]
    if rates is None:
        weights = np.ones(len(denoisers))
    elif isinstance(rates, Mapping):
        if set(rates) != set(kinds):
            raise UserError(f"UL2 rates by kind {dict(rates)} must give a share to exactly the kinds "
                            f"of the denoisers ({', '.join(sorted(set(kinds)))}): fix the keys")
        weights = np.array([float(rates[k]) / kinds.count(k) for k in kinds])
    else:
        weights = np.asarray(rates, dtype=np.float64).reshape(-1)
        if len(weights) != len(denoisers):
            raise UserError(f"UL2 rates has {len(weights)} weights for {len(denoisers)} denoisers: "
                            "give one weight per denoiser")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise UserError(f"UL2 rates {list(weights)} must be non-negative and not all zero: fix them")
    return weights / weights.sum()


# --- Lengths ------------------------------------------------------------------------------------


def _most_lengths(denoiser: Denoiser, length: int, mode_length: int, num_sentinels: int) -> tuple[int, int]:
    """The longest (inputs, targets), EOS included, that `denoiser` makes from `length` raw tokens."""
    r = denoiser.noise_density
    if denoiser.kind == "S":  # P.prefix_lm: the prefix keeps [round((1 - 2r)(L - 1)), L - 1] tokens
        max_inputs = length - 1
        min_inputs = min(max_inputs, max(1, int(np.round((1 - 2 * r) * max_inputs)))) if max_inputs > 0 else 0
        return mode_length + max(max_inputs, 0) + 1, length - min_inputs + 1
    length = max(length, 2)  # as random_spans_noise_mask: an upper bound for 0 and 1 tokens
    noise, spans = P.noise_counts(length, r, denoiser.mean_noise_span_length, np.ceil, num_sentinels)
    return mode_length + length - noise + spans + 1, noise + spans + 1


def ul2_raw_length(feature_lengths: Mapping[str, int], denoisers: Sequence[Denoiser],
                   mode_lengths: Mapping[str, int], num_sentinels: int = P.NUM_SENTINELS) -> int:
    """The largest raw chunk length whose every chunk (shorter last chunks too) fits every denoiser
    into feature_lengths['inputs'] / ['targets']."""
    limit_in, limit_out = feature_lengths["inputs"], feature_lengths["targets"]
    length = 0
    while True:
        fits = all(a <= limit_in and b <= limit_out for a, b in
                   (_most_lengths(d, length + 1, mode_lengths[d.kind], num_sentinels) for d in denoisers))
        if not fits:
            return length
        length += 1


def ul2_feature_lengths(raw_length: int, denoisers: Sequence[Denoiser], mode_lengths: Mapping[str, int],
                        num_sentinels: int = P.NUM_SENTINELS) -> dict[str, int]:
    """{'inputs', 'targets'}: the feature lengths that hold every UL2 example of chunks up to raw_length."""
    most = [_most_lengths(d, n, mode_lengths[d.kind], num_sentinels)
            for d in denoisers for n in range(1, raw_length + 1)]
    return {"inputs": max(a for a, _ in most), "targets": max(b for _, b in most)}


def _warn_capped_spans(denoisers: Sequence[Denoiser], raw_length: int, num_sentinels: int) -> None:
    """Say which denoisers would need more spans than there are sentinels at this chunk length."""
    for d in denoisers:
        if d.kind == "S" or raw_length < 2:
            continue
        noise, wanted = P.noise_counts(raw_length, d.noise_density, d.mean_noise_span_length, np.ceil)
        if wanted > num_sentinels:
            logging.warning("UL2 %s on %d-token chunks needs up to %d noise spans but there are %d sentinels: "
                            "it makes %d longer spans (mean %.1f tokens)", d, raw_length, wanted,
                            num_sentinels, num_sentinels, noise / num_sentinels)


# --- Recipes --------------------------------------------------------------------------------------


def _tokenize_documents(vocab, text_key: str, eos: bool):
    """Document text -> {'targets': ids} (+ EOS, so a language model sees where documents end)."""
    def tokenize(example, rng):
        if text_key not in example:
            raise UserError(f"example has no text field {text_key!r} (it has {sorted(example)}): set "
                            "text_key to the source's text field")
        out = P.tokenize({"targets": example[text_key]}, vocab, keys=("targets",), copy_pretokenized=False)
        return P.append_eos(out, vocab.eos_id) if eos else out
    return tokenize


def _require(feature_lengths, keys: Sequence[str], what: str, example: dict) -> None:
    if not feature_lengths or any(k not in feature_lengths for k in keys):
        raise UserError(f"{what} needs feature_lengths with {' and '.join(map(repr, keys))}, got "
                        f"{feature_lengths}: use e.g. {example}")


def ul2_denoise(example: dict, rng: np.random.Generator, *, denoisers: Sequence[Denoiser],
                probabilities: np.ndarray, mode_ids: Mapping[str, np.ndarray], vocab_size: int,
                num_sentinels: int = P.NUM_SENTINELS) -> dict:
    """One chunk ('targets') -> {'inputs': mode token + corrupted, 'targets', 'denoiser': index},
    the denoiser drawn from the chunk's rng at `probabilities`."""
    k = int(rng.choice(len(denoisers), p=probabilities))
    d = denoisers[k]
    if d.kind == "S":
        out = P.prefix_lm(example, rng, noise_density=d.noise_density)
    else:
        out = P.span_corruption(example, rng, vocab_size=vocab_size, noise_density=d.noise_density,
                                mean_noise_span_length=d.mean_noise_span_length, num_sentinels=num_sentinels,
                                unbiased_span_count=True, cap_spans=True)
    return {**out, "inputs": np.concatenate([mode_ids[d.kind], out["inputs"]]).astype(np.int32), "denoiser": k}


def ul2_preprocessors(vocab, feature_lengths, *, denoisers: Sequence = UL2_DENOISERS, rates="uniform",
                      mode_tokens: Mapping[str, str] | None = MODE_TOKENS, text_key: str = "text",
                      raw_length: int | None = None) -> list:
    """UL2: tokenize `text_key` -> raw chunks -> one denoiser per chunk (+ mode token) -> EOS.

    raw_length defaults to the largest that fits feature_lengths (module docstring); a given one
    must fit them. mode_tokens None (or {}) leaves the inputs without a mode token.
    """
    _require(feature_lengths, ("inputs", "targets"), "UL2", {"inputs": 512, "targets": 512})
    denoisers = tuple(as_denoiser(d) for d in denoisers)
    if not denoisers:
        raise UserError("UL2 needs at least one denoiser: give the denoiser list")
    probabilities = mixing_rates(denoisers, rates)
    mode_tokens = mode_tokens or {}
    mode_ids = {kind: np.asarray(vocab.encode(mode_tokens[kind]) if kind in mode_tokens else [], np.int32)
                for kind in MODE_TOKENS}
    mode_lengths = {kind: len(ids) for kind, ids in mode_ids.items()}
    num_sentinels = P.NUM_SENTINELS
    if raw_length is None:
        raw_length = ul2_raw_length(feature_lengths, denoisers, mode_lengths, num_sentinels)
        if raw_length < 8:
            raise UserError(f"feature_lengths {dict(feature_lengths)} leave UL2 only {raw_length} raw tokens "
                            "per example: raise them (e.g. {'inputs': 128, 'targets': 128})")
    else:
        needed = ul2_feature_lengths(raw_length, denoisers, mode_lengths, num_sentinels)
        if any(needed[k] > feature_lengths[k] for k in needed):
            raise UserError(f"UL2 chunks of {raw_length} raw tokens need feature_lengths {needed}, more than "
                            f"{dict(feature_lengths)}: raise them or drop raw_length")
    _warn_capped_spans(denoisers, raw_length, num_sentinels)

    def denoise(example, rng):
        return ul2_denoise(example, rng, denoisers=denoisers, probabilities=probabilities,
                           mode_ids=mode_ids, vocab_size=vocab.vocab_size, num_sentinels=num_sentinels)

    return [_tokenize_documents(vocab, text_key, eos=False), pipeline.split_tokens(raw_length, "targets"),
            denoise, lambda ex, rng: P.append_eos(ex, vocab.eos_id)]


def causal_lm_preprocessors(vocab, feature_lengths, *, text_key: str = "text") -> list:
    """GPT-style language modelling for DecoderOnly: documents + EOS, concatenated, cut into
    feature_lengths['targets']-token rows; the loss covers every token."""
    if feature_lengths and "inputs" in feature_lengths:
        raise UserError(f"a causal LM has no inputs: give feature_lengths {{'targets': L}} only, not "
                        f"{dict(feature_lengths)} (a prefix LM task takes both)")
    _require(feature_lengths, ("targets",), "causal LM", {"targets": 512})
    return [_tokenize_documents(vocab, text_key, eos=True),
            pipeline.split_tokens(feature_lengths["targets"], "targets")]


def prefix_lm_preprocessors(vocab, feature_lengths, *, text_key: str = "text",
                            noise_density: float = 0.5) -> list:
    """Prefix LM: documents + EOS, concatenated, cut into min(inputs, targets)-token chunks, each
    split at a random pivot (P.prefix_lm: uniform for noise_density 0.5) into inputs and targets.

    DecoderOnly rows hold inputs + targets, i.e. two chunks when the lengths are equal; the loss
    covers only the targets and the prefix attends bidirectionally (T5Config.decoder_only_prefix_lm).
    """
    _require(feature_lengths, ("inputs", "targets"), "prefix LM", {"inputs": 256, "targets": 256})
    raw_length = min(feature_lengths["inputs"], feature_lengths["targets"])
    if raw_length < 2:
        raise UserError(f"prefix LM needs inputs and targets lengths >= 2, got {dict(feature_lengths)}")
    return [_tokenize_documents(vocab, text_key, eos=True), pipeline.split_tokens(raw_length, "targets"),
            lambda ex, rng: P.prefix_lm(ex, rng, noise_density=noise_density)]


def text_infilling_preprocessors(vocab, feature_lengths, *, text_key: str = "text", noise_density: float = 0.3,
                                 mean_noise_span_length: float = 3.0) -> list:
    """BART-style text infilling (P.text_infilling): documents cut into (targets - 1)-token chunks (EOS
    makes targets), each chunk's spans replaced by sentinels in the inputs, the whole chunk the target.
    inputs needs no more than targets: the corrupted chunk is always shorter than the chunk."""
    _require(feature_lengths, ("inputs", "targets"), "text infilling", {"inputs": 128, "targets": 128})
    raw_length = min(feature_lengths["inputs"], feature_lengths["targets"] - 1)
    if raw_length < 2:
        raise UserError(f"text infilling needs inputs >= 2 and targets >= 3, got {dict(feature_lengths)}")
    infill = functools.partial(P.text_infilling, vocab_size=vocab.vocab_size, noise_density=noise_density,
                               mean_noise_span_length=mean_noise_span_length)
    return [_tokenize_documents(vocab, text_key, eos=False), pipeline.split_tokens(raw_length, "targets"),
            infill, lambda ex, rng: P.append_eos(ex, vocab.eos_id)]
