"""Preprocessors against independent references written here (T5's algorithms as plain loops)."""

import collections
import itertools

import numpy as np
import pytest

from t5lite.data import preprocessors as P
from t5lite.errors import UserError

VOCAB = 32100  # T5's 32000 pieces + 100 sentinels
FIRST_SENTINEL = VOCAB - 100


# --- References -------------------------------------------------------------------------------


def ref_counts(length, density, mean_span):
    """T5's counts for a mask over `length` >= 2 tokens: (noise tokens, noise spans)."""
    noise = round(length * density)
    noise = min(max(noise, 1), length - 1)
    return noise, max(round(noise / mean_span), 1)


def ref_noise_mask(length, density, mean_span, rng):
    """T5's random_spans_noise_mask transcribed with loops (shuffled segment-start indicators)."""
    orig, length = length, max(length, 2)
    noise, spans = ref_counts(length, density, mean_span)

    def segmentation(items, segments):
        starts = [1] * (segments - 1) + [0] * (items - segments)
        rng.shuffle(starts)
        lengths = [1]
        for s in starts:
            if s:
                lengths.append(1)
            else:
                lengths[-1] += 1
        return lengths

    mask = []
    for keep, drop in zip(segmentation(length - noise, spans), segmentation(noise, spans)):
        mask += [False] * keep + [True] * drop
    return np.array(mask[:orig], dtype=bool)


def ref_sentinel_transform(tokens, mask, vocab_size):
    """T5's noise_span_to_unique_sentinel / nonnoise_span_to_unique_sentinel as a loop."""
    inputs, targets, sentinel = [], [], vocab_size
    for i, (tok, is_noise) in enumerate(zip(tokens, mask)):
        if is_noise:
            if i == 0 or not mask[i - 1]:
                sentinel -= 1
                inputs.append(sentinel)
                targets.append(sentinel)
            targets.append(tok)
        else:
            inputs.append(tok)
    return inputs, targets


def ref_span_corruption_lengths(inputs_length, density=0.15, mean_span=3.0):
    """T5's random_spans_helper by exhaustive search: the longest raw length that fits."""
    def lengths(n):
        noise = round(n * density)
        spans = round(noise / mean_span)
        return n - noise + spans + 1, noise + spans + 1
    best = max(n for n in range(inputs_length, 3 * inputs_length) if lengths(n)[0] <= inputs_length)
    return best, lengths(best)[1]


def deinterleave(inputs, targets, vocab_size):
    """Rebuild the original tokens: replace each sentinel in inputs by its span from targets."""
    is_sent_t = targets >= vocab_size - 100
    starts = np.flatnonzero(is_sent_t)
    spans = {int(targets[s]): targets[s + 1:e] for s, e in zip(starts, list(starts[1:]) + [len(targets)])}
    pieces, prev = [], 0
    for j in np.flatnonzero(inputs >= vocab_size - 100):
        pieces += [inputs[prev:j], spans.pop(int(inputs[j]))]
        prev = j + 1
    pieces.append(inputs[prev:])
    assert not spans, "targets hold spans the inputs never reference"
    return np.concatenate(pieces)


def random_tokens(rng, length):
    return rng.integers(3, FIRST_SENTINEL, size=length).astype(np.int32)


# --- Noise mask -------------------------------------------------------------------------------


@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.3, 1.0), (0.5, 3.0), (0.15, 8.0)])
def test_noise_mask_counts_and_shape_match_t5(density, mean_span):
    rng = np.random.default_rng(0)
    for length in range(0, 700):
        mask = P.random_spans_noise_mask(length, density, mean_span, rng)
        assert mask.shape == (length,) and mask.dtype == bool
        if length < 2:
            assert not mask.any()  # built for 2 tokens ([False, True]) then cut
            continue
        noise, spans = ref_counts(length, density, mean_span)
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        assert mask.sum() == noise, length
        assert starts.sum() == spans, length
        assert not mask[0] and mask[-1]  # starts with non-noise, ends with noise, like T5


def test_noise_mask_is_uniform_over_all_valid_masks():
    # 10 tokens, 4 noise in 2 spans: 3 ways to split the noise x 5 ways to split the 6 others.
    length, density, mean_span, n = 10, 0.4, 2.0, 6000
    valid = set()
    for a in range(1, 4):
        for b in range(1, 6):
            valid.add((False,) * b + (True,) * a + (False,) * (6 - b) + (True,) * (4 - a))
    rng = np.random.default_rng(1)
    ours = collections.Counter(tuple(P.random_spans_noise_mask(length, density, mean_span, rng))
                               for _ in range(n))
    ref = collections.Counter(tuple(ref_noise_mask(length, density, mean_span, rng)) for _ in range(n))
    assert set(ours) == set(ref) == valid
    expected, sd = n / 15, (n / 15 * (1 - 1 / 15)) ** 0.5
    for counts in (ours, ref):
        assert all(abs(c - expected) < 5 * sd for c in counts.values()), counts


def test_noise_mask_span_length_distribution_matches_reference():
    rng = np.random.default_rng(2)

    def span_lengths(mask):
        runs = [len(list(g)) for k, g in itertools.groupby(mask) if k]
        return collections.Counter(runs)

    ours, ref = collections.Counter(), collections.Counter()
    for _ in range(1500):
        ours += span_lengths(P.random_spans_noise_mask(100, 0.15, 3.0, rng))
        ref += span_lengths(ref_noise_mask(100, 0.15, 3.0, rng))
    total = sum(ref.values())
    for k in range(1, 8):  # P(span length = k), 15 tokens in 5 spans
        assert abs(ours[k] - ref[k]) / total < 0.02, (k, ours[k], ref[k])


def test_noise_mask_degenerate_settings_stay_valid():
    rng = np.random.default_rng(3)
    mask = P.random_spans_noise_mask(10, 0.9, 1.0, rng)  # 9 noise tokens, 1 non-noise
    assert mask.sum() == 9 and not mask[0]


# --- Span corruption --------------------------------------------------------------------------


def test_span_corruption_lengths_match_t5():
    assert P.span_corruption_lengths(512) == (568, 114)
    for n in (16, 32, 64, 100, 114, 128, 177, 256, 512, 626, 1024, 2048):
        assert P.span_corruption_lengths(n) == ref_span_corruption_lengths(n), n
    for n in (64, 128, 512):
        assert P.span_corruption_lengths(n, 0.3, 2.0) == ref_span_corruption_lengths(n, 0.3, 2.0)
    with pytest.raises(UserError):
        P.span_corruption_lengths(2)


def test_span_corruption_matches_loop_reference_for_the_same_mask():
    rng = np.random.default_rng(4)
    for i in range(300):
        tokens = random_tokens(rng, int(rng.integers(0, 300)))
        out = P.span_corruption({"targets": tokens}, np.random.default_rng(i), vocab_size=VOCAB)
        mask = P.random_spans_noise_mask(len(tokens), 0.15, 3.0, np.random.default_rng(i))
        inputs, targets = ref_sentinel_transform(tokens, mask, VOCAB)
        np.testing.assert_array_equal(out["inputs"], inputs)
        np.testing.assert_array_equal(out["targets"], targets)
        assert out["inputs"].dtype == out["targets"].dtype == np.int32


def check_corruption(tokens, out):
    inputs, targets = out["inputs"], out["targets"]
    np.testing.assert_array_equal(deinterleave(inputs, targets, VOCAB), tokens)
    sent_in, sent_t = inputs[inputs >= FIRST_SENTINEL], targets[targets >= FIRST_SENTINEL]
    k = len(sent_in)
    np.testing.assert_array_equal(sent_in, VOCAB - 1 - np.arange(k))  # count down from the top
    np.testing.assert_array_equal(sent_t, sent_in)
    assert k >= 1 and targets[0] == VOCAB - 1  # targets open with the first sentinel
    assert inputs[-1] == VOCAB - k  # T5's mask ends with noise
    return len(targets) - k, k  # noise tokens, spans


def test_span_corruption_on_10000_mixed_length_sequences():
    rng = np.random.default_rng(5)
    noise = spans = total = 0
    for _ in range(10_000):
        tokens = random_tokens(rng, int(rng.integers(20, 1200)))
        n, k = check_corruption(tokens, P.span_corruption({"targets": tokens}, rng, vocab_size=VOCAB))
        noise, spans, total = noise + n, spans + k, total + len(tokens)
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.1


def test_span_corruption_568_tokens_fill_512_and_114_after_eos():
    raw, targets_len = P.span_corruption_lengths(512)
    rng = np.random.default_rng(6)
    for _ in range(10_000):
        tokens = random_tokens(rng, raw)
        out = P.span_corruption({"targets": tokens, "id": 7}, rng, vocab_size=VOCAB)
        check_corruption(tokens, out)
        out = P.append_eos(out, eos_id=1)
        assert (len(out["inputs"]), len(out["targets"])) == (512, targets_len) == (512, 114)
        assert out["inputs"][-1] == out["targets"][-1] == 1 and out["id"] == 7
    for n in (128, 256):
        raw, targets_len = P.span_corruption_lengths(n)
        out = P.append_eos(P.span_corruption({"targets": random_tokens(rng, raw)}, rng, vocab_size=VOCAB))
        assert (len(out["inputs"]), len(out["targets"])) == (n, targets_len)


def test_span_corruption_same_seed_same_output():
    tokens = random_tokens(np.random.default_rng(7), 568)
    a, b, c = (P.span_corruption({"targets": tokens}, np.random.default_rng(s), vocab_size=VOCAB)
               for s in (11, 11, 12))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_span_corruption_edges_and_options():
    rng = np.random.default_rng(8)
    empty = P.span_corruption({"targets": []}, rng, vocab_size=VOCAB)
    assert len(empty["inputs"]) == len(empty["targets"]) == 0
    one = P.span_corruption({"targets": [5]}, rng, vocab_size=VOCAB)
    assert one["inputs"].tolist() == [5] and one["targets"].tolist() == []
    out = P.span_corruption({"text": np.arange(3, 40)}, rng, vocab_size=50, input_feature="text")
    assert out["inputs"].max() == 49 and out["targets"][0] == 49
    P.span_corruption({"targets": random_tokens(rng, 2000)}, rng, vocab_size=VOCAB)  # 100 spans
    with pytest.raises(UserError, match="100 sentinels"):
        P.span_corruption({"targets": random_tokens(rng, 2100)}, rng, vocab_size=VOCAB)  # 105


# --- Prefix LM and chunks ---------------------------------------------------------------------


def test_prefix_lm_splits_at_a_random_point():
    rng = np.random.default_rng(9)
    tokens = np.arange(3, 23, dtype=np.int32)  # 20 tokens
    cuts = collections.Counter()
    for _ in range(2000):
        out = P.prefix_lm({"targets": tokens}, rng)
        np.testing.assert_array_equal(np.concatenate([out["inputs"], out["targets"]]), tokens)
        cuts[len(out["inputs"])] += 1
    assert set(cuts) == set(range(1, 20))  # every cut leaving both sides non-empty
    # noise_density 0.25: the prefix keeps at least round(0.5 * 19) = 10 tokens (T5's rule).
    cuts = {len(P.prefix_lm({"targets": tokens}, rng, noise_density=0.25)["inputs"]) for _ in range(500)}
    assert cuts == set(range(10, 20))
    assert P.prefix_lm({"targets": [4]}, rng)["targets"].tolist() == [4]
    with pytest.raises(UserError):
        P.prefix_lm({"targets": tokens}, rng, noise_density=0.7)


def test_select_random_chunk_picks_aligned_chunks():
    rng = np.random.default_rng(10)
    doc = np.arange(250)
    starts = collections.Counter()
    for _ in range(600):
        chunk = P.select_random_chunk(doc, rng, 100)
        np.testing.assert_array_equal(chunk, np.arange(chunk[0], chunk[0] + len(chunk)))
        starts[int(chunk[0])] += 1
        assert len(chunk) == (50 if chunk[0] == 200 else 100)
    assert set(starts) == {0, 100, 200} and min(starts.values()) > 120
    np.testing.assert_array_equal(P.select_random_chunk(np.arange(30), rng, 100), np.arange(30))


# --- Text, tokens, lengths --------------------------------------------------------------------


class CharVocab:
    """A stand-in vocabulary: one id per character (ord + 3)."""

    def encode(self, text):
        return [ord(c) + 3 for c in text]


def test_text_to_text_and_tokenize():
    ex = {"en": b"Hello", "es": np.array("Hola"), "id": 3}
    out = P.text_to_text(ex, prefix="translate English to Spanish: ", inputs_key="en", targets_key="es")
    assert out == {"inputs": "translate English to Spanish: Hello", "targets": "Hola", "id": 3}
    tok = P.tokenize(out, CharVocab())
    assert tok["inputs"].dtype == np.int32
    assert tok["inputs"].tolist() == [ord(c) + 3 for c in out["inputs"]]
    assert tok["targets_pretokenized"] == "Hola" and tok["id"] == 3
    only_targets = P.tokenize({"targets": "ab"}, CharVocab(), copy_pretokenized=False)
    assert set(only_targets) == {"targets"} and only_targets["targets"].tolist() == [100, 101]
    with pytest.raises(UserError, match="'fr'"):
        P.text_to_text(ex, inputs_key="fr", targets_key="es")
    with pytest.raises(UserError):
        P.tokenize({"text": "x"}, CharVocab())
    with pytest.raises(UserError):
        P.tokenize(tok, CharVocab())  # already tokenized


def test_trim_and_append_eos():
    ex = {"inputs": np.arange(3, 13), "targets": np.arange(3, 6), "id": "a"}
    trimmed = P.trim(ex, {"inputs": 4, "targets": 10, "missing": 2})
    assert trimmed["inputs"].tolist() == [3, 4, 5, 6] and trimmed["targets"].tolist() == [3, 4, 5]
    out = P.append_eos(ex)
    assert out["inputs"].tolist() == list(range(3, 13)) + [1] and out["targets"].tolist() == [3, 4, 5, 1]
    out = P.append_eos(ex, eos_id=1, keys=("inputs",), lengths={"inputs": 4})
    assert out["inputs"].tolist() == [3, 4, 5, 1] and out["targets"] is ex["targets"]
    assert out["inputs"].dtype == np.int32
    short = P.append_eos({"targets": [7]}, lengths={"targets": 4})
    assert short["targets"].tolist() == [7, 1]


def test_missing_field_is_a_user_error():
    rng = np.random.default_rng(11)
    with pytest.raises(UserError, match="'targets'.*'text'"):
        P.span_corruption({"text": [5, 6, 7]}, rng, vocab_size=VOCAB)
    with pytest.raises(UserError, match="'targets'"):
        P.prefix_lm({"text": [5, 6, 7]}, rng)
