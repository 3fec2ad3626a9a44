"""Autoregressive decoding on a key/value cache: greedy, beam search, and sampling.

The encoder runs once per example (not per beam); the decoder runs one token per step on the
cache (self-attention keys and values grow in place, cross-attention keys and values are
projected once and shared by an example's beams; both are stored heads first, the layout the
attention matmuls read, see MultiHeadAttention). Everything is one `jax.jit` with a
`lax.while_loop` that stops when every example has finished.

Beam search follows HF transformers' `generate` (the reference the tests compare against):
2k candidates per step, hypotheses finish at EOS or at max length, scores are
sum log-prob / length**alpha (or T5X's ((5 + length) / 6)**alpha), and with
`early_stopping=True` an example is done once it holds k finished hypotheses.

Adapter cards (t5lite/model/lora.py): `cards` is a stacked table of LoRA cards and `card_index`
gives each example its card (< 0: the base alone); one jitted call decodes the mixed batch, and
beams inherit their example's card.
"""

import contextlib
import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from t5lite.data.vocab import EOS_ID
from t5lite.errors import UserError
from t5lite.model import DecoderOnly, EncoderDecoder, T5Config, lora
from t5lite.model.layers import first_argmax

NEG_INF = -1.0e9  # HF's "impossible" score; finite so that sums stay ordered
METHODS = ("greedy", "beam", "sample")


# --- The model as a step function on a cache -------------------------------------------------


class _StepFn(NamedTuple):
    """init() -> (cache, first-token logits [N, V]); step(cache, tokens [N, 1], position) -> (logits, cache).

    N = B * repeat rows, the `repeat` beams of an example adjacent. What is the same for every beam (the
    encoder, the cross-attention keys and values, the prompt or start token) runs once per example in
    init(), whose self-attention cache is then repeated for the beams.
    """
    init: callable
    step: callable
    first_position: jax.Array  # position of the first generated token in the decoder sequence


def _encoder_decoder_steps(config, variables, encoder_input_tokens, max_decode_length, repeat, cards) -> _StepFn:
    model = EncoderDecoder(config)
    cache_length = max_decode_length + 1  # start token + generated tokens (+1 unused beam-search step)
    enc = encoder_input_tokens  # [B, L]
    row_enc = jnp.repeat(enc, repeat, axis=0)  # [N, L]: each row's cross-attention mask
    start = jnp.zeros((enc.shape[0], 1), jnp.int32)

    def run(cache, encoder_tokens, tokens, position):
        logits, cached = model.apply({**variables, "cache": cache}, None, encoder_tokens, tokens, decode=True,
                                     decode_position=position, max_decode_length=cache_length,
                                     method=model.decode, mutable=["cache"])
        return logits[:, -1], cached["cache"]

    def init():
        with cards(1):
            encoded = model.apply(variables, enc, method=model.encode)  # [B, L, D]
            # Allocates the cache and projects cross-attention keys/values; then decodes the start token.
            _, cached = model.apply(variables, encoded, enc, start, decode=True, max_decode_length=cache_length,
                                    method=model.decode, mutable=["cache"])
            logits, cache = run(cached["cache"], enc, start, jnp.int32(0))
        return _repeat_rows(logits, cache, repeat, config)

    def step(cache, tokens, position):
        with cards(repeat):
            return run(cache, row_enc, tokens, position)

    return _StepFn(init, step, jnp.int32(1))


def _decoder_only_steps(config, variables, prompt_tokens, max_decode_length, repeat, cards) -> _StepFn:
    """Prompts are right-aligned in one block of P + 1 slots and prefilled at once ([0, x1..xn]
    after left padding); padding slots are masked out of attention, and each token's position
    is its slot minus its row's padding, so the left padding changes nothing for any position
    scheme (relative ones only see offsets anyway)."""
    model = DecoderOnly(config)
    p = prompt_tokens.shape[1]  # [B, P] right-padded
    lengths = jnp.sum(prompt_tokens > 0, axis=1)  # [B]
    cache_len = p + 1 + max_decode_length
    cols = jnp.arange(p + 1)
    slots = jnp.arange(cache_len)
    shift = p - lengths  # left padding per example
    src = cols[None, :] - 1 - shift[:, None]  # prompt index feeding each prefill column
    prefill = jnp.where(src >= 0, jnp.take_along_axis(prompt_tokens, jnp.clip(src, 0, p - 1), axis=1), 0)  # [B, P+1]
    key_valid = slots[None, :] >= shift[:, None]  # [B, Lc]
    rows = dict(shift=shift, key_valid=key_valid,
                prefix=jnp.logical_and(key_valid, slots[None, :] <= p))  # the prompt block is the prefix
    beam_rows = jax.tree.map(lambda x: jnp.repeat(x, repeat, axis=0), rows)  # [N, ...]

    def run(cache, tokens, position, shift, key_valid, prefix):
        slots = position + jnp.arange(tokens.shape[1])  # [len]
        positions = jnp.maximum(slots[None, :] - shift[:, None], 0)  # [rows, len]; padding slots are masked
        logits, cached = model.apply({**variables, "cache": cache}, tokens, decode=True,
                                     decode_position=position, max_decode_length=cache_len,
                                     decoder_key_valid=key_valid, decoder_causal_attention=prefix,
                                     decoder_positions=positions, mutable=["cache"])
        return logits[:, -1], cached["cache"]

    def init():
        with cards(1):
            _, cached = model.apply(variables, prefill[:, :1], decode=True, max_decode_length=cache_len,
                                    mutable=["cache"])
            logits, cache = run(cached["cache"], prefill, jnp.int32(0), **rows)
        return _repeat_rows(logits, cache, repeat, config)

    def step(cache, tokens, position):
        with cards(repeat):
            return run(cache, tokens, position, **beam_rows)

    return _StepFn(init, step, jnp.int32(p + 1))


def _cache_batch_axis(config: T5Config) -> int:
    return 1 if config.scan_layers else 0  # scanned caches stack layers first


def _reorder_cache(cache, flat_indices, batch_axis):
    """Gathers the self-attention cache rows of the surviving beams (cross k/v never change)."""
    def gather(path, x):
        name = path[-1].key
        return jnp.take(x, flat_indices, axis=batch_axis) if name in ("cached_key", "cached_value") else x
    return jax.tree_util.tree_map_with_path(gather, cache)


def _repeat_rows(logits, cache, repeat, config):
    """One row per example -> `repeat` adjacent rows (its beams): the logits and the self-attention cache.
    The cross-attention cache keeps one row per example, which its beams share (see MultiHeadAttention)."""
    if repeat == 1:
        return logits, cache
    rows = jnp.repeat(jnp.arange(logits.shape[0]), repeat)  # [N]
    return jnp.take(logits, rows, axis=0), _reorder_cache(cache, rows, _cache_batch_axis(config))


# --- Token choice --------------------------------------------------------------------------------


def _filter_logits(logits, temperature, top_k, top_p):
    """Temperature, then top-k, then nucleus (top-p) filtering, in HF's order. logits [N, V]."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [N, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)  # ascending
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Drop the low tail whose total mass is <= 1 - top_p; always keep the most likely token.
        drop = cumulative <= 1.0 - top_p
        drop = drop.at[:, -1].set(False)
        threshold = jnp.min(jnp.where(drop, jnp.inf, sorted_logits), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _finalize(tokens):
    """Zero everything after each row's first EOS. tokens [B, T]."""
    after_eos = jnp.cumsum(jnp.cumsum(tokens == EOS_ID, axis=1), axis=1) > 1
    return jnp.where(after_eos, 0, tokens).astype(jnp.int32)


def _sample_or_greedy(steps: _StepFn, batch, max_decode_length, greedy, temperature, top_k, top_p, seed):
    logits, cache = steps.init()
    key = jax.random.key(seed)
    tokens = jnp.zeros((batch, max_decode_length), jnp.int32)
    done, score = jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32)

    def choose(t, logits, tokens, done, score):
        if greedy:
            nxt = first_argmax(logits)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(key, t), _filter_logits(logits, temperature, top_k, top_p))
        nxt = jnp.where(done, 0, nxt).astype(jnp.int32)
        # log p(nxt) = logit - logsumexp: no [B, V] log-softmax written per step
        logits = logits.astype(jnp.float32)  # [B, V]
        log_prob = jnp.take_along_axis(logits, nxt[:, None], axis=1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
        score = score + jnp.where(done, 0.0, log_prob)
        return tokens.at[:, t].set(nxt), done | (nxt == EOS_ID), score

    tokens, done, score = choose(0, logits, tokens, done, score)

    def cond(state):
        t, _, _, done, _ = state
        return (t < max_decode_length) & ~jnp.all(done)

    def body(state):
        t, cache, tokens, done, score = state
        last = jax.lax.dynamic_slice_in_dim(tokens, t - 1, 1, axis=1)  # [B, 1]
        logits, cache = steps.step(cache, last, steps.first_position + t - 1)
        tokens, done, score = choose(t, logits, tokens, done, score)
        return t + 1, cache, tokens, done, score

    _, _, tokens, _, score = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tokens, done, score))
    return _finalize(tokens), score


# --- Beam search ---------------------------------------------------------------------------------


def _length_penalty(length, alpha, style):
    length = jnp.asarray(length, jnp.float32)
    return ((5.0 + length) / 6.0) ** alpha if style == "t5x" else length ** alpha


class _Beams(NamedTuple):
    t: jax.Array  # number of tokens generated so far
    cache: dict
    logits: jax.Array  # [B*K, V] next-token logits of the running beams
    running: jax.Array  # [B, K, T] running sequences
    running_scores: jax.Array  # [B, K] summed log-probs
    finished: jax.Array  # [B, K, T] best finished hypotheses, best first
    finished_scores: jax.Array  # [B, K] length-penalised
    finished_flags: jax.Array  # [B, K]
    can_improve: jax.Array  # [B] HF's early-stop heuristic is not yet satisfied
    all_hit_stop: jax.Array  # [] every candidate of the last step finished


def _beam_search(steps: _StepFn, batch, k, max_decode_length, alpha, style, early_stopping, batch_axis):
    logits, cache = steps.init()
    T = max_decode_length
    gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    top_k_mask = jnp.arange(2 * k) < k  # only the k best candidates may finish (HF)
    running_scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
    state = _Beams(jnp.int32(0), cache, logits, jnp.zeros((batch, k, T), jnp.int32), running_scores,
                   jnp.zeros((batch, k, T), jnp.int32), jnp.full((batch, k), NEG_INF, jnp.float32),
                   jnp.zeros((batch, k), bool), jnp.ones((batch,), bool), jnp.array(False))

    stop_when_full = early_stopping is True

    def cond(s: _Beams):
        exists_open = ~(jnp.all(s.finished_flags) & stop_when_full)
        return (s.t < T) & jnp.any(s.can_improve) & exists_open & ~s.all_hit_stop

    def body(s: _Beams):
        vocab = s.logits.shape[-1]
        log_probs = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
        total = (log_probs + s.running_scores[:, :, None]).reshape(batch, k * vocab)
        cand_scores, cand_idx = jax.lax.top_k(total, 2 * k)  # [B, 2K]
        cand_beam, cand_token = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
        cand_seqs = gather(s.running, cand_beam).at[:, :, s.t].set(cand_token)  # [B, 2K, T]
        hits = (cand_token == EOS_ID) | (s.t + 1 >= T)  # [B, 2K]

        # Running beams: the k best candidates that did not finish.
        alive_scores, alive_idx = jax.lax.top_k(cand_scores + hits * NEG_INF, k)  # [B, K]
        running = gather(cand_seqs, alive_idx)
        source_beam = gather(cand_beam, alive_idx)  # [B, K]

        # Finished hypotheses: merge the newly finished ones into the best k so far.
        new_scores = cand_scores / _length_penalty(s.t + 1, alpha, style)
        full = jnp.all(s.finished_flags, axis=1, keepdims=True) & stop_when_full
        new_scores = new_scores + full * NEG_INF + (~s.can_improve)[:, None] * NEG_INF
        just_finished = hits & top_k_mask[None]
        new_scores = new_scores + (~just_finished) * NEG_INF
        merged_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)
        finished_scores, keep = jax.lax.top_k(merged_scores, k)
        finished = gather(jnp.concatenate([s.finished, cand_seqs], axis=1), keep)
        finished_flags = gather(jnp.concatenate([s.finished_flags, just_finished], axis=1), keep)

        # HF's heuristic: could the best running beam still beat the worst finished one?
        length = T if (early_stopping == "never" and alpha > 0) else s.t + 1
        best_running = alive_scores[:, 0] / _length_penalty(length, alpha, style)
        worst_finished = jnp.where(finished_flags, jnp.min(finished_scores, axis=1, keepdims=True), NEG_INF)
        can_improve = s.can_improve & jnp.any(best_running[:, None] > worst_finished, axis=1)

        flat_source = (jnp.arange(batch)[:, None] * k + source_beam).reshape(-1)
        cache = _reorder_cache(s.cache, flat_source, batch_axis)
        tokens = running[:, :, s.t].reshape(-1, 1)
        # Unconditional: after the last token this computes one unused step (the cache has a slot
        # for it), which is cheaper than a lax.cond that copies the whole cache through its branches.
        logits, cache = steps.step(cache, tokens, steps.first_position + s.t)
        return _Beams(s.t + 1, cache, logits, running, alive_scores, finished, finished_scores, finished_flags,
                      can_improve, jnp.all(hits))

    s = jax.lax.while_loop(cond, body, state)
    return _finalize(s.finished[:, 0]), s.finished_scores[:, 0]


# --- Public entry --------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=(
    "config", "max_decode_length", "method", "num_beams", "length_penalty", "length_penalty_style",
    "early_stopping", "temperature", "top_k", "top_p", "decoder_only", "card_spec"))
def _generate(config, params, inputs, seed, card_table, card_scales, card_index, *, max_decode_length, method,
              num_beams, length_penalty, length_penalty_style, early_stopping, temperature, top_k, top_p,
              decoder_only, card_spec):
    batch = inputs.shape[0]
    repeat = num_beams if method == "beam" else 1
    make_steps = _decoder_only_steps if decoder_only else _encoder_decoder_steps
    variables = {"params": params}
    if card_spec is not None:
        variables[lora.COLLECTION] = card_table

    def cards(rows_per_example):
        """The context in which the model applies each example's card to its rows (beams adjacent)."""
        if card_spec is None:
            return contextlib.nullcontext()
        return lora.adapted(card_spec, jnp.repeat(card_index, rows_per_example), card_scales)

    steps = make_steps(config, variables, inputs, max_decode_length, repeat, cards)
    if method == "beam":
        return _beam_search(steps, batch, num_beams, max_decode_length, length_penalty, length_penalty_style,
                            early_stopping, _cache_batch_axis(config))
    return _sample_or_greedy(steps, batch, max_decode_length, method == "greedy", temperature, top_k, top_p, seed)


def generate(config: T5Config, params, encoder_input_tokens, *, max_decode_length: int, method: str = "greedy",
             num_beams: int = 4, length_penalty: float = 1.0, length_penalty_style: str = "hf",
             early_stopping=True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             decoder_only: bool = False, cards: Optional[lora.CardTable] = None,
             card_index=None) -> Tuple[jax.Array, jax.Array]:
    """Decodes a batch -> (tokens int32 [B, max_decode_length], 0 after EOS; scores float32 [B]).

    method: 'greedy', 'beam' (best of `num_beams`; score = sum log-prob / length penalty) or
    'sample' (temperature / top_k / top_p, seeded; score = the model's log-probability).
    `decoder_only`: `encoder_input_tokens` are prompts of a DecoderOnly model ([B, P], right-padded).
    `cards` (lora.stack_cards) with `card_index` [B] (< 0: no card): each example decodes with its own card.
    """
    if method not in METHODS:
        raise UserError(f"unknown decoding method {method!r}; choose from {', '.join(METHODS)}")
    if max_decode_length < 1:
        raise UserError(f"max_decode_length must be >= 1, got {max_decode_length}")
    if method == "beam" and num_beams < 1:
        raise UserError(f"num_beams must be >= 1, got {num_beams}")
    if method == "sample" and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise UserError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
    if length_penalty_style not in ("hf", "t5x"):
        raise UserError(f"length_penalty_style must be 'hf' or 't5x', got {length_penalty_style!r}")
    inputs = jnp.asarray(np.asarray(encoder_input_tokens), jnp.int32)
    if cards is not None:
        card_index = np.zeros(len(inputs), np.int32) if card_index is None else np.asarray(card_index, np.int32)
        if card_index.shape != (len(inputs),) or card_index.max(initial=-1) >= len(cards.scales):
            raise UserError(f"card_index must hold one card number < {len(cards.scales)} (or -1) per example")
    table, scales = (cards.table, cards.scales) if cards is not None else (None, None)
    return _generate(config, params, inputs, jnp.int32(seed), table, scales, card_index,
                     card_spec=cards.spec if cards is not None else None, max_decode_length=int(max_decode_length),
                     method=method, num_beams=int(num_beams), length_penalty=float(length_penalty),
                     length_penalty_style=length_penalty_style, early_stopping=early_stopping,
                     temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                     decoder_only=bool(decoder_only))
