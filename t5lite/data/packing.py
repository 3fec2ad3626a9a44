"""Feature conversion: trim examples, pack (or pad) them into rows, and name the features as T5X.

Encoder-decoder rows: `encoder_input_tokens`, `decoder_target_tokens`, `decoder_input_tokens`,
`decoder_loss_weights` (+ `encoder_/decoder_segment_ids`, `encoder_/decoder_positions` when
packed). Decoder-only rows hold inputs then targets in one sequence, loss on the targets only,
and `decoder_causal_attention` marks the bidirectional prefix (as seqio's PrefixLMFeatureConverter).
Token 0 is padding and the decoder start; segment ids count 1, 2, ... per row (0 = padding);
positions restart at 0 in every segment.
"""

from __future__ import annotations

from typing import Any, Mapping

import grain
import numpy as np

from t5lite.errors import UserError

_EMPTY = np.zeros([0], np.int32)


def row_lengths(feature_lengths: Mapping[str, int], decoder_only: bool) -> dict[str, int]:
    """Lengths of the packed row features: {'inputs', 'targets'}, or decoder-only {'targets', 'inputs_mask'}."""
    for key in ("targets",) if decoder_only else ("inputs", "targets"):
        if key not in feature_lengths:
            raise UserError(f"feature_lengths {dict(feature_lengths)} has no {key!r} length: add one "
                            "(e.g. {'inputs': 512, 'targets': 114})")
    for key, n in feature_lengths.items():
        if not isinstance(n, (int, np.integer)) or n <= 0:
            raise UserError(f"feature_lengths[{key!r}] = {n!r}: lengths must be positive integers")
    if not decoder_only:
        return {"inputs": int(feature_lengths["inputs"]), "targets": int(feature_lengths["targets"])}
    # Decoder-only: a prefix-LM row holds the inputs and the targets (seqio: their sum).
    length = int(feature_lengths["targets"]) + int(feature_lengths.get("inputs", 0))
    return {"targets": length, "inputs_mask": length}


def _tokens(example: Mapping[str, Any], key: str) -> np.ndarray:
    """example[key] as a 1-D int32 array, with a UserError when it is missing or not tokens."""
    if key not in example:
        raise UserError(f"pipeline: example has no field {key!r} (it has {sorted(example)}): "
                        "add a tokenize step that produces it")
    value = np.asarray(example[key])
    if value.dtype.kind not in "iu":
        raise UserError(f"pipeline: field {key!r} holds {value.dtype} values, not token ids: "
                        "tokenize it in the preprocessors")
    return value.astype(np.int32).reshape(-1)


def prepare_example(example: Mapping[str, Any], feature_lengths: Mapping[str, int],
                    decoder_only: bool) -> dict | None:
    """Keep the token features, trimmed to `feature_lengths`; None when no target token is left.

    Decoder-only: one sequence, inputs then targets, and `inputs_mask` = 1 on the inputs.
    """
    targets = _tokens(example, "targets")[:feature_lengths["targets"]]  # [<= Lt]
    if len(targets) == 0:  # nothing to learn from: drop it rather than waste a segment
        return None
    if not decoder_only:
        inputs = _tokens(example, "inputs")[:feature_lengths["inputs"]]  # [<= Li]
        return {"inputs": inputs, "targets": targets}
    if "inputs" in feature_lengths:
        inputs = _tokens(example, "inputs")[:feature_lengths["inputs"]] if "inputs" in example else _EMPTY
    elif "inputs" in example:
        raise UserError("decoder-only pipeline: examples have 'inputs' but feature_lengths has no "
                        "'inputs' length: add one for a prefix LM, or drop the field")
    else:
        inputs = _EMPTY
    return {"targets": np.concatenate([inputs, targets]),  # [Li' + Lt']
            "inputs_mask": np.concatenate([np.ones_like(inputs), np.zeros_like(targets)])}


def pad_example(example: Mapping[str, np.ndarray], lengths: Mapping[str, int]) -> dict:
    """One example as a one-segment row: each feature zero-padded, with segment ids and positions."""
    row = {}
    for key, length in lengths.items():
        tokens = example[key]
        n = len(tokens)
        row[key] = np.pad(tokens, (0, length - n))  # [L]
        row[f"{key}_segment_ids"] = (np.arange(length) < n).astype(np.int32)  # [L]
        row[f"{key}_positions"] = np.where(np.arange(length) < n, np.arange(length), 0).astype(np.int32)
    return row


def shift_right(tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Shift right by one within each segment: every segment (and all padding) starts with 0."""
    shifted = np.zeros_like(tokens)  # [..., L]
    shifted[..., 1:] = tokens[..., :-1]
    return np.where(positions == 0, 0, shifted)


def to_model_features(row: Mapping[str, np.ndarray], decoder_only: bool, packed: bool,
                      prefix_lm: bool) -> dict[str, np.ndarray]:
    """A packed or padded row -> the model's T5X feature dict (int32, all of length L)."""
    targets = row["targets"]  # [Lt]
    segments, positions = row["targets_segment_ids"], row["targets_positions"]  # [Lt]
    out = {"decoder_target_tokens": targets,
           "decoder_input_tokens": shift_right(targets, positions),
           "decoder_loss_weights": segments > 0}
    if decoder_only:
        inputs_mask = row["inputs_mask"]  # [Lt]
        out["decoder_loss_weights"] = out["decoder_loss_weights"] & (inputs_mask == 0)
        if prefix_lm:  # the prefix plus the first target's input (the last prefix token) see each other
            out["decoder_causal_attention"] = inputs_mask | shift_right(inputs_mask, positions)
    else:
        out["encoder_input_tokens"] = row["inputs"]  # [Li]
        if packed:
            out["encoder_segment_ids"] = row["inputs_segment_ids"]
            out["encoder_positions"] = row["inputs_positions"]
    if packed:
        out["decoder_segment_ids"], out["decoder_positions"] = segments, positions
    return {k: np.asarray(v, np.int32) for k, v in out.items()}


def padding_rows(n: int, feature_lengths: Mapping[str, int], *, decoder_only: bool, pack: bool) -> dict:
    """`n` all-padding rows of model features (every token, segment and loss weight 0): what a data
    shard that has run out contributes to a batch. dict of int32 [n, L]."""
    lengths = row_lengths(feature_lengths, decoder_only)
    empty = {}
    for key, length in lengths.items():
        empty.update({key: np.zeros([length], np.int32), f"{key}_segment_ids": np.zeros([length], np.int32),
                      f"{key}_positions": np.zeros([length], np.int32)})
    row = to_model_features(empty, decoder_only, pack, prefix_lm=decoder_only and "inputs" in feature_lengths)
    return {k: np.zeros((n,) + v.shape, np.int32) for k, v in row.items()}


def pack_or_pad(ds: grain.IterDataset, feature_lengths: Mapping[str, int], *, decoder_only: bool,
                pack: bool, pack_window: int) -> grain.IterDataset:
    """Examples -> rows of model features. Packing is grain's first-fit over `pack_window` rows.

    First-fit fills `pack_window` rows in order and emits them all once an example fits none,
    so the rows depend only on the example order (deterministic and restorable).
    """
    lengths = row_lengths(feature_lengths, decoder_only)
    prefix_lm = decoder_only and "inputs" in feature_lengths
    ds = ds.map(lambda ex: prepare_example(ex, feature_lengths, decoder_only))
    ds = ds.filter(lambda ex: ex is not None)
    if pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=lengths, num_packing_bins=pack_window, shuffle_bins=False)
    else:
        ds = ds.map(lambda ex: pad_example(ex, lengths))
    return ds.map(lambda row: to_model_features(row, decoder_only, pack, prefix_lm))
