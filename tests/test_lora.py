"""LoRA cards in the model (t5lite/model/lora.py): exact no-op when fresh, W + (alpha/r) A B, targets,
layouts, the base fingerprint, and many cards in one decode batch."""

import jax
import numpy as np
import pytest

from t5lite.errors import UserError
from t5lite.infer.decoding import generate
from t5lite.model import EncoderDecoder, abstract_params, count_params, get_config, init_params, lora, scan_params
from t5lite.model.params import attention_in_layout

ENC = np.array([[5, 9, 23, 7, 1, 0], [44, 3, 17, 1, 0, 0]], np.int32)
DEC = np.array([[0, 8, 12, 30], [0, 61, 2, 0]], np.int32)


def _card(config, spec, seed, b_scale=0.3):
    """A card with random B (a trained card's stand-in), in the unscanned layout."""
    card = jax.jit(lambda k: lora.init_card(config.replace(scan_layers=False), spec, k))(jax.random.key(seed))
    key = jax.random.key(seed + 100)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + b_scale * jax.random.normal(jax.random.fold_in(key, hash(jax.tree_util.keystr(p)) % 2**31),
                                                     x.shape) if p[-1].key == "lora_b" else x, card)


def _params(config, seed=0):
    return jax.jit(lambda key: init_params(config, key))(jax.random.key(seed))


def _logits(config, params, card=None, spec=None):
    """Teacher-forced logits (jitted: eager flax is slow), with the card when one is given."""
    model = EncoderDecoder(config)
    if card is None:
        return np.asarray(jax.jit(lambda p: model.apply({"params": p}, ENC, DEC))(params))

    def adapted(p, c):
        with lora.adapted(spec):
            return model.apply({"params": p, "lora": c}, ENC, DEC)

    return np.asarray(jax.jit(adapted)(params, lora.in_layout(card, config)))


def test_mixture_of_experts_experts_carry_no_card():
    """In an MoE model (MoE MLP in every 2nd layer) 'wi' / 'wo' adapt the dense MLPs and the attention, never
    the experts; a fresh card is still a no-op and a trained one changes the outputs."""
    config = get_config("tiny", mlp="moe", num_experts=4, moe_every=2)
    spec = lora.LoraConfig(rank=2, targets=("q", "wi", "wo"))
    paths = list(lora.flat_paths(lora.abstract_card(config, spec)))
    assert paths and not any("expert" in p for p in paths)
    assert any("layers_0/mlp/wi_0" in p for p in paths) and not any("layers_1/mlp" in p for p in paths)
    params = _params(config)
    fresh = jax.jit(lambda k: lora.init_card(config, spec, k))(jax.random.key(1))
    np.testing.assert_array_equal(_logits(config, params, fresh, spec), _logits(config, params))
    assert np.abs(_logits(config, params, _card(config, spec, 2), spec) - _logits(config, params)).max() > 1e-3
    with pytest.raises(UserError, match="'expert/wi_0' matches no projection"):
        lora.check_targets(lora.LoraConfig(targets=("expert/wi_0",)), config)


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_card_leaves_the_outputs_bit_identical(scan):
    config = get_config("tiny", scan_layers=scan)
    params = _params(config)
    spec = lora.LoraConfig(rank=4, targets=("q", "k", "v", "o", "wi", "wo"))
    fresh = jax.jit(lambda k: lora.init_card(config, spec, k))(jax.random.key(1))
    assert all(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(fresh)[::2])  # A random, B zero
    assert all(not np.any(np.asarray(b)) for b in jax.tree.leaves(fresh)[1::2])
    np.testing.assert_array_equal(_logits(config, params, fresh, spec), _logits(config, params))


def test_card_equals_its_weights_folded_in_with_numpy():
    """y = x W + (alpha / r) x A B: the adapted model equals the base whose kernels are W + (alpha / r) A B
    (computed here in float64 NumPy, independent of lora.merge), and lora.merge gives the same kernels."""
    config = get_config("tiny")
    params = _params(config)
    spec = lora.LoraConfig(rank=3, alpha=12.0, targets=("q", "v", "o", "wo"))
    card = _card(config, spec, 2)
    folded = lora.flat_paths(jax.tree.map(np.asarray, params))
    for path, a in lora.flat_paths(card).items():
        if path.endswith("lora_a"):
            module = path[:-len("/lora_a")]
            b, kernel = np.asarray(lora.flat_paths(card)[f"{module}/lora_b"], np.float64), folded[f"{module}/kernel"]
            a = np.asarray(a, np.float64).reshape(-1, spec.rank)
            folded[f"{module}/kernel"] = (kernel + 4.0 * (a @ b.reshape(spec.rank, -1)).reshape(kernel.shape)
                                          ).astype(np.float32)
    reference = _logits(config, lora.nest_paths(folded))
    adapted = _logits(config, params, card, spec)
    assert np.abs(adapted - _logits(config, params)).max() > 0.1  # the card matters
    np.testing.assert_allclose(adapted, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    merged = lora.flat_paths(lora.merge(params, card, spec))
    for path, kernel in folded.items():
        np.testing.assert_allclose(merged[path], kernel, rtol=1e-5, atol=1e-6)


def test_targets_follow_peft_names_and_patterns():
    config = get_config("tiny")

    def adapted(*targets):
        card = lora.abstract_card(config, lora.LoraConfig(targets=targets))
        return sorted(p[:-len("/lora_a")] for p in lora.flat_paths(card) if p.endswith("lora_a"))

    qv = adapted("q", "v")  # PEFT's T5 default: every self- and cross-attention's q and v
    assert len(qv) == 2 * (2 + 2 * 2) and all(p.endswith(("/query", "/value")) for p in qv)
    assert "decoder/layers_1/encoder_decoder_attention/query" in qv
    assert adapted("encoder_decoder_attention/query") == [f"decoder/layers_{i}/encoder_decoder_attention/query"
                                                          for i in range(2)]
    assert {p.rsplit("/", 1)[1] for p in adapted("wi", "wo")} == {"wi_0", "wi_1", "wo"}
    with pytest.raises(UserError, match="target 'qq' matches no projection.*named key, logits_dense, out"):
        lora.check_targets(lora.LoraConfig(targets=("q", "qq")), config)
    for bad in (dict(rank=0), dict(alpha=-1.0), dict(dropout=1.0), dict(targets=()), dict(targets=("q[",))):
        with pytest.raises(UserError, match="LoraConfig"):
            lora.LoraConfig(**bad)


def test_trainable_fraction_of_rank_8_q_v_on_t5_1_1_small():
    """r (d_model + heads * head_dim) per q or v projection: 24 attentions (8 encoder, 8 + 8 decoder) x 2."""
    config = get_config("t5_1_1_small")
    card = lora.abstract_card(config, lora.LoraConfig(rank=8, targets=("q", "v")))
    expected = 24 * 2 * 8 * (512 + 6 * 64)
    assert lora.num_card_params(card) == expected == 344_064
    fraction = expected / count_params(abstract_params(config))
    assert fraction < 0.01, fraction  # 0.45 %


def test_card_shards_and_scans_like_the_base():
    config = get_config("tiny", scan_layers=True)
    axes = jax.tree.map(lambda x: x.names, lora.abstract_card(config, lora.LoraConfig(targets=("q", "o"))),
                        is_leaf=lambda x: hasattr(x, "names"))
    attention = axes["encoder"]["layers"]["attention"]
    assert attention["query"] == {"lora_a": ("layers", "embed", None), "lora_b": ("layers", None, "heads", "kv")}
    assert attention["out"] == {"lora_a": ("layers", "heads", "kv", None), "lora_b": ("layers", None, "embed")}
    params = _params(config.replace(scan_layers=False))
    spec = lora.LoraConfig(rank=2, targets=("q", "o"))
    card = _card(config, spec, 3)
    np.testing.assert_allclose(_logits(config, scan_params(params), card, spec),
                               _logits(config.replace(scan_layers=False), params, card, spec), rtol=1e-5, atol=1e-5)


def test_fingerprint_is_layout_independent_and_tells_bases_apart():
    config = get_config("tiny")
    params = _params(config)
    fingerprint = lora.fingerprint(params, config)
    assert lora.fingerprint(scan_params(params), config) == fingerprint
    split = config.replace(attention_layout="split")
    assert lora.fingerprint(attention_in_layout(params, split), split) == fingerprint
    # The digest t5lite gave this base before attention kernels were joined (same seed, split kernels), so
    # cards saved then still match their base (it also pins that both layouts initialise the same values).
    assert fingerprint == "ded9fc3570e9829cfe10"
    assert lora.fingerprint(_params(config, 1), config) != fingerprint
    tuned = jax.tree.map(lambda x: x * (1 + 1e-6), params)  # a fine-tune moves every weight a little
    assert lora.fingerprint(tuned, config) != fingerprint


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_mixed_batch_decodes_each_example_with_its_own_card(method):
    """Cards A (rank 4, q/v), B (rank 2, o/wi) and none in one batch give the tokens of three separate runs
    on the merged checkpoints (and the base)."""
    config = get_config("tiny", scan_layers=True)
    params = scan_params(_params(config.replace(scan_layers=False)))
    spec_a, spec_b = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "v")), lora.LoraConfig(rank=2, targets=("o", "wi"))
    card_a, card_b = _card(config, spec_a, 1), _card(config, spec_b, 2)
    inputs = np.random.default_rng(0).integers(2, 500, (6, 9)).astype(np.int32)
    index = np.array([0, 1, -1, 1, 0, -1])
    table = lora.stack_cards([(spec_a, card_a), (spec_b, card_b)], config)
    kwargs = dict(max_decode_length=8, method=method, num_beams=3)
    mixed, mixed_scores = map(np.asarray, generate(config, params, inputs, cards=table, card_index=index, **kwargs))
    singles = []
    for spec, card in [(spec_a, card_a), (spec_b, card_b)]:
        merged = lora.merge(params, lora.in_layout(card, config), spec)
        singles.append(tuple(map(np.asarray, generate(config, merged, inputs, **kwargs))))
    singles.append(tuple(map(np.asarray, generate(config, params, inputs, **kwargs))))
    for number, (tokens, scores) in zip([0, 1, -1], singles):
        rows = index == number
        np.testing.assert_array_equal(mixed[rows], tokens[rows])
        np.testing.assert_allclose(mixed_scores[rows], scores[rows], rtol=1e-4, atol=1e-4)
    assert not np.array_equal(singles[0][0], singles[2][0]) and not np.array_equal(singles[1][0], singles[2][0])
