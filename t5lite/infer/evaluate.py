"""Batch decoding of texts and evaluation of a task split: metrics by name plus perplexity.

Batches follow a token budget: inputs are sorted by length and grouped so that a batch holds at
most `batch_size` inputs and, padded to its length bucket (a power of two, at most `input_length`),
at most `max_batch_tokens` tokens; one long input is never padded into a batch of short ones.
Results come back in input order. Bucketed lengths and row counts bound the compiled shapes.
Inputs longer than `input_length` are truncated (keeping EOS) with one warning that counts them,
or rejected when `strict=True`.
"""

import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5lite import metrics as metrics_lib
from t5lite.data.vocab import EOS_ID
from t5lite.errors import UserError
from t5lite.infer.decoding import generate
from t5lite.model import EncoderDecoder, lora


def pad_inputs(token_lists: Sequence[Sequence[int]], input_length: int, eos_id: Optional[int] = EOS_ID,
               strict: bool = False, numbers: Optional[Sequence[int]] = None,
               trim: bool = False) -> (np.ndarray, int):
    """Token lists -> int32 [N, input_length] (right-padded) and how many were truncated.

    A truncated input keeps its final EOS (unless eos_id is None); `numbers` name the inputs in
    the --strict error (default: their index). `trim`: only as wide as the longest input's length
    bucket (see token_budget_batches), so a huge input_length allocates nothing for columns of padding."""
    width = input_length
    if trim:
        longest = max((len(t) for t in token_lists), default=1)
        width = min(input_length, max(_next_power_of_two(longest), _MIN_BUCKET))
    out = np.zeros((len(token_lists), width), np.int32)
    truncated = 0
    for i, tokens in enumerate(token_lists):
        tokens = list(tokens)
        if len(tokens) > input_length:
            if strict:
                number = numbers[i] if numbers is not None else i
                raise UserError(f"input {number} has {len(tokens)} tokens, more than input_length {input_length}; "
                                "raise --input_length or drop --strict to truncate")
            truncated += 1
            tokens = tokens[:input_length - 1] + [eos_id] if eos_id is not None else tokens[:input_length]
        out[i, :len(tokens)] = tokens
    return out, truncated


def _fill_batch(rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Repeats the first row up to `batch_size` rows, so the last batch keeps the compiled shape."""
    missing = batch_size - len(rows)
    return np.concatenate([rows, np.repeat(rows[:1], missing, axis=0)]) if missing > 0 else rows


DEFAULT_TOKENS_PER_ROW = 128  # max_batch_tokens defaults to batch_size x this (the default input_length)
_MIN_BUCKET = 16


def _next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def token_budget_batches(lengths: Sequence[int], *, batch_size: int, input_length: int,
                         max_batch_tokens: Optional[int] = None) -> List[tuple]:
    """Groups inputs of these token lengths into batches -> [(indices, rows, length)].

    Inputs are taken shortest first; a batch is padded to `length` (the next power of two >= its longest
    input, at least 16, at most input_length) and to `rows` (the next power of two >= its size, at most
    batch_size), and holds at most max_batch_tokens (default batch_size x 128) padded tokens, but always at
    least one input. Few distinct (rows, length) shapes -> few compiles."""
    if batch_size < 1 or input_length < 1:
        raise UserError(f"batch_size and input_length must be >= 1, got {batch_size} and {input_length}")
    budget = max_batch_tokens if max_batch_tokens is not None else batch_size * DEFAULT_TOKENS_PER_ROW
    if budget < 1:
        raise UserError(f"max_batch_tokens must be >= 1, got {budget}")

    def shape(longest, count):
        length = min(max(_next_power_of_two(longest), _MIN_BUCKET), input_length)
        cap = max(1, min(batch_size, budget // length))
        return min(_next_power_of_two(count), cap), length, cap

    order = np.argsort(np.asarray(lengths, np.int64), kind="stable")
    batches, current = [], []
    for i in order:
        if current and len(current) + 1 > shape(lengths[i], len(current) + 1)[2]:
            batches.append(current)
            current = []
        current.append(int(i))
    if current:
        batches.append(current)
    return [(np.asarray(b), *shape(max(lengths[i] for i in b), len(b))[:2]) for b in batches]


def _input_lengths(inputs: np.ndarray) -> np.ndarray:
    """Tokens before the right padding of each row of [N, L] -> [N] (a row of padding only: 1)."""
    nonzero = inputs != 0
    last = np.where(nonzero.any(axis=1), inputs.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 1)
    return last.astype(np.int64)


def decode_batches(config, params, inputs: np.ndarray, *, batch_size: int, max_decode_length: int,
                   decoder_only: bool = False, progress=None, cards=None, card_index=None,
                   max_batch_tokens: Optional[int] = None, **decode_kwargs):
    """Decodes [N, L] right-padded inputs in token-budget batches (token_budget_batches) -> (tokens [N, T],
    scores [N]) in input order.

    `cards` (a lora.CardTable) and `card_index` [N]: example i decodes with card card_index[i] (< 0: none;
    no card_index: every example with card 0)."""
    tokens = np.zeros((len(inputs), max_decode_length), np.int32)
    scores = np.zeros((len(inputs),), np.float32)
    card_index = _card_index_or_first(cards, card_index, len(inputs))
    plan = token_budget_batches(_input_lengths(inputs), batch_size=batch_size, input_length=inputs.shape[1],
                                max_batch_tokens=max_batch_tokens)
    for rows_of, rows, length in plan:
        chunk = _fill_batch(inputs[rows_of, :length], rows)  # [rows, length]
        index = None if cards is None else _fill_batch(card_index[rows_of], rows)
        out, score = generate(config, params, chunk, max_decode_length=max_decode_length,
                              decoder_only=decoder_only, cards=cards, card_index=index, **decode_kwargs)
        tokens[rows_of] = np.asarray(out)[:len(rows_of)]
        scores[rows_of] = np.asarray(score)[:len(rows_of)]
        if progress is not None:
            progress.update(len(rows_of))
    return tokens, scores


def _card_index_or_first(cards, card_index, n: int) -> Optional[np.ndarray]:
    """Each example's card number [N]: `card_index`, or card 0 for all (one card); None without cards."""
    if cards is None:
        return None
    return np.zeros(n, np.int32) if card_index is None else np.asarray(card_index, np.int32)


def _apply(model, params, cards, card_index, *args, **kwargs):
    """model.apply with the base params, and each example's card from the CardTable when one is given."""
    if cards is None:
        return model.apply({"params": params}, *args, **kwargs)
    with lora.adapted(cards.spec, card_index, cards.scales):
        return model.apply({"params": params, lora.COLLECTION: cards.table}, *args, **kwargs)


def _decoder_only_rows(inputs: np.ndarray, targets: np.ndarray):
    """[N, Li] prompts + [N, Lt] targets -> decoder-only rows (prompt then target, left-aligned), their
    shifted inputs, prefix flags and target weights, as t5lite.data.packing builds them. [N, Li + Lt]."""
    n, length = len(inputs), inputs.shape[1] + targets.shape[1]
    tokens, prefix, weights = (np.zeros((n, length), np.int32) for _ in range(3))
    for i, (prompt, target) in enumerate(zip(inputs, targets)):
        prompt, target = prompt[prompt > 0], target[target > 0]
        row = np.concatenate([prompt, target])
        tokens[i, :len(row)] = row
        prefix[i, :len(prompt) + 1] = 1  # the prompt and the first target's input (its last token)
        weights[i, len(prompt):len(row)] = 1
    shifted = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    return tokens, shifted, prefix, weights


def target_log_likelihoods(config, params, inputs: np.ndarray, targets: np.ndarray, batch_size: int,
                           decoder_only: bool = False, cards=None, card_index=None,
                           max_batch_tokens: Optional[int] = None):
    """Sum of log p(target token) per example under teacher forcing -> (log-likelihoods [N], token counts [N]).

    Decoder-only models score the targets after the prompt in one sequence (prefix attention when the
    model is a prefix LM). `cards` / `card_index`: each example scored with its card (see decode_batches).
    Batches follow the inputs' token budget, as decode_batches."""
    card_index = _card_index_or_first(cards, card_index, len(inputs))
    plan = token_budget_batches(_input_lengths(inputs), batch_size=batch_size, input_length=inputs.shape[1],
                                max_batch_tokens=max_batch_tokens)
    if decoder_only:
        from t5lite.model import DecoderOnly
        model = DecoderOnly(config)

        @jax.jit
        def score(index, dec_in, tgt, prefix, weights):
            logits = _apply(model, params, cards, index, dec_in, decoder_target_tokens=tgt,
                            decoder_causal_attention=prefix)
            picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tgt[..., None], axis=-1)[..., 0]
            return jnp.sum(picked * weights, axis=1)

        def columns(rows_of, length):
            tgt, dec_in, prefix, weights = _decoder_only_rows(inputs[rows_of, :length], targets[rows_of])
            return dec_in, tgt, prefix, weights
    else:
        model = EncoderDecoder(config)

        @jax.jit
        def score(index, enc, tgt):
            dec_in = jnp.concatenate([jnp.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
            logits = _apply(model, params, cards, index, enc, dec_in, decoder_target_tokens=tgt)
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(log_probs, tgt[..., None], axis=-1)[..., 0]
            return jnp.sum(picked * (tgt > 0), axis=1)

        def columns(rows_of, length):
            return inputs[rows_of, :length], targets[rows_of]
    totals = np.zeros((len(inputs),))
    for rows_of, rows, length in plan:
        chunk = [_fill_batch(c, rows) for c in columns(rows_of, length)]
        index = None if cards is None else _fill_batch(card_index[rows_of], rows)
        totals[rows_of] = np.asarray(score(index, *chunk))[:len(rows_of)]
    return totals, (targets > 0).sum(axis=1)


def decode_task_split(config, params, task, vocab, *, split: str, max_examples: Optional[int], batch_size: int,
                      input_length: int, max_decode_length: int, strict: bool = False, decoder_only: bool = False,
                      progress=None, **decode_kwargs):
    """Decodes the first `max_examples` examples of a task split, in order -> (examples, padded inputs
    [N, input_length], output tokens [N, T], scores [N])."""
    examples = task.eval_examples(split, vocab, max_examples=max_examples)
    if not examples:
        raise UserError(f"split {split!r} of task {task.name!r} has no examples to decode")
    inputs, truncated = pad_inputs([ex["inputs"] for ex in examples], input_length, vocab.eos_id, strict, trim=True)
    if truncated:
        logging.warning("%d of %d inputs were longer than input_length %d and were truncated",
                        truncated, len(examples), input_length)
    tokens, scores = decode_batches(config, params, inputs, batch_size=batch_size, max_decode_length=max_decode_length,
                                    decoder_only=decoder_only, progress=progress, **decode_kwargs)
    return examples, inputs, tokens, scores


def evaluate_task(config, params, task, vocab, *, split: str = "validation", max_examples: Optional[int] = None,
                  batch_size: int = 32, input_length: int = 128, max_decode_length: int = 64,
                  strict: bool = False, decoder_only: bool = False, progress=None, cards=None,
                  max_batch_tokens: Optional[int] = None, **decode_kwargs) -> (Dict[str, float], List[dict]):
    """Decodes `split` of `task`, scores it with the task's metrics -> (metrics, per-example records).

    Besides the task's metrics: `perplexity` of the reference targets under teacher forcing
    (exp of the mean negative log-likelihood per target token) and `num_examples`. `cards` (a
    lora.CardTable): the base with card 0 (`t5lite eval --card`), for decoding and perplexity alike.
    """
    examples, inputs, tokens, scores = decode_task_split(
        config, params, task, vocab, split=split, max_examples=max_examples, batch_size=batch_size,
        input_length=input_length, max_decode_length=max_decode_length, strict=strict, decoder_only=decoder_only,
        progress=progress, cards=cards, max_batch_tokens=max_batch_tokens, **decode_kwargs)
    predictions = [task.postprocess(vocab.decode(row)) for row in tokens]
    targets = [ex["targets_pretokenized"] for ex in examples]
    results = metrics_lib.compute(list(task.metrics), targets, predictions)

    target_tokens = [vocab.encode(t) + [vocab.eos_id] for t in targets]
    target_length = max(max(len(t) for t in target_tokens), 1)
    tgt, _ = pad_inputs(target_tokens, target_length, vocab.eos_id)
    log_likelihood, counts = target_log_likelihoods(config, params, inputs, tgt, batch_size, decoder_only, cards,
                                                    max_batch_tokens=max_batch_tokens)
    results["perplexity"] = math.exp(min(-float(log_likelihood.sum()) / max(int(counts.sum()), 1), 50.0))
    results["num_examples"] = len(examples)
    records = [dict(input=ex["inputs_pretokenized"], target=t, prediction=p, score=float(s))
               for ex, t, p, s in zip(examples, targets, predictions, scores)]
    return results, records


def _continues_text(config, decoder_only: bool) -> bool:
    """A causal LM continues its prompt; every other model reads an input that ends in EOS, as the
    training examples' inputs do."""
    return decoder_only and not config.decoder_only_prefix_lm


def decode_texts(config, params, vocab, texts: Iterable[str], *, input_length: int = 128,
                 batch_size: int = 32, max_decode_length: int = 64, strict: bool = False,
                 decoder_only: bool = False, progress=None, cards=None, card_index=None,
                 **decode_kwargs) -> List[dict]:
    """Raw input texts -> [{'input', 'output', 'score'}] in order (what `t5lite infer` writes).

    A blank input gets an empty output and no score (it is not decoded), so output line k always
    answers input line k. `cards` / `card_index` (one per text): see decode_batches."""
    texts = list(texts)
    real = [i for i, t in enumerate(texts) if t.strip()]
    eos = None if _continues_text(config, decoder_only) else vocab.eos_id
    tokens = [vocab.encode(texts[i]) + ([eos] if eos is not None else []) for i in real]
    inputs, truncated = pad_inputs(tokens, input_length, eos, strict, numbers=[i + 1 for i in real], trim=True)
    if truncated:
        logging.warning("%d of %d inputs were longer than input_length %d and were truncated",
                        truncated, len(texts), input_length)
    index = None if cards is None else _card_index_or_first(cards, card_index, len(texts))[real]
    out, scores = decode_batches(config, params, inputs, batch_size=batch_size, max_decode_length=max_decode_length,
                                 decoder_only=decoder_only, progress=progress, cards=cards, card_index=index,
                                 **decode_kwargs)
    records = [dict(input=t, output="", score=None) for t in texts]
    for i, row, score in zip(real, out, scores):
        records[i].update(output=vocab.decode(row), score=float(score))
    if progress is not None:
        progress.update(len(texts) - len(real))
    return records


__all__ = ["evaluate_task", "decode_task_split", "decode_texts", "decode_batches", "pad_inputs",
           "target_log_likelihoods", "token_budget_batches"]
