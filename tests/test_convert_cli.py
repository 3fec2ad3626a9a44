"""`t5lite convert` end to end, and the one-line errors for bad input (exit code 2, nothing written)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5lite.cli import main
from t5lite.convert.hf import from_hf
from t5lite.convert.safetensors_io import read_safetensors, write_safetensors
from t5lite.model import EncoderDecoder
from t5lite.model.params import attention_in_layout
from t5lite.train.checkpoint import TRAIN_FORMAT, load_params, save_params
from t5lite.train.checks import resumed_attention_layout
from tests.hf_reference import hf_logits, load_hf, make_hf_checkpoint, random_batch

SPEC = dict(vocab_size=96, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=2, feed_forward_proj="gated-gelu")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "model"
    make_hf_checkpoint(path, untied=True, **SPEC)
    return str(path)


def test_convert_round_trip(hf_dir, tmp_path, capsys):
    assert main(["convert", "from-hf", "--hf_dir", hf_dir, "--out", str(tmp_path / "ckpt")]) == 0
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "params"]
    config, params = load_params(str(tmp_path / "ckpt"))
    assert (config, ) == (from_hf(hf_dir)[0], )

    assert main(["convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    original, back = read_safetensors(hf_dir), read_safetensors(str(tmp_path / "back"))
    assert set(back) <= set(original)
    for name in back:
        np.testing.assert_array_equal(back[name], original[name])

    enc, dec_in, targets = random_batch(np.random.default_rng(0), 96, [9, 4], [6, 2], 9, 6)
    ours = np.asarray(EncoderDecoder(config).apply({"params": params}, enc, dec_in, decoder_target_tokens=targets))
    ref = hf_logits(load_hf(str(tmp_path / "back")), enc, dec_in)
    np.testing.assert_allclose(ours[targets > 0], ref[targets > 0], atol=1e-4 * np.abs(ref).max())


def test_load_params_restacks_for_scan(hf_dir, tmp_path):
    assert main(["convert", "from-hf", "--hf_dir", hf_dir, "--out", str(tmp_path / "ckpt")]) == 0
    config, params = load_params(str(tmp_path / "ckpt"))
    scan_cfg, scanned = load_params(str(tmp_path / "ckpt"), config.replace(scan_layers=True))
    assert scanned["encoder"]["layers"]["mlp"]["wo"]["kernel"].shape[0] == 2
    batch = dict(encoder_input_tokens=np.array([[5, 6, 1]]), decoder_input_tokens=np.array([[0, 7]]))
    np.testing.assert_allclose(EncoderDecoder(scan_cfg).apply({"params": scanned}, **batch),
                               EncoderDecoder(config).apply({"params": params}, **batch), rtol=1e-5, atol=1e-5)


def test_checkpoint_saved_in_the_split_attention_layout_loads_joined(hf_dir, tmp_path):
    """A checkpoint saved before attention kernels were joined (3-D kernels, no attention_layout in its
    config) loads as it was saved, and into the joined layout with identical logits; a run resumes in it."""
    assert main(["convert", "from-hf", "--hf_dir", hf_dir, "--out", str(tmp_path / "ckpt")]) == 0
    config, params = load_params(str(tmp_path / "ckpt"))
    assert config.attention_layout == "joined" and params["encoder"]["layers_0"]["attention"]["query"]["kernel"].shape \
        == (16, 16)
    old = config.replace(attention_layout="split")
    save_params(str(tmp_path / "old"), old, attention_in_layout(params, old))
    meta = json.load(open(tmp_path / "old" / "config.json"))
    del meta["model"]["attention_layout"]  # as every checkpoint written before the field existed
    json.dump(meta, open(tmp_path / "old" / "config.json", "w"))

    stored_cfg, stored = load_params(str(tmp_path / "old"))
    assert stored_cfg == old and stored["encoder"]["layers_0"]["attention"]["query"]["kernel"].shape == (16, 4, 4)
    assert stored["decoder"]["layers_1"]["self_attention"]["out"]["kernel"].shape == (4, 4, 16)
    joined_cfg, joined = load_params(str(tmp_path / "old"), config)
    assert joined_cfg == config and jax.tree.map(np.shape, joined) == jax.tree.map(np.shape, params)
    batch = dict(encoder_input_tokens=np.array([[5, 6, 1]]), decoder_input_tokens=np.array([[0, 7]]))
    logits = np.asarray(EncoderDecoder(config).apply({"params": params}, **batch))
    np.testing.assert_array_equal(np.asarray(EncoderDecoder(config).apply({"params": joined}, **batch)), logits)
    np.testing.assert_array_equal(np.asarray(EncoderDecoder(old).apply({"params": stored}, **batch)), logits)

    # A training run whose checkpoints hold split kernels resumes in that layout, whatever its gin says.
    step_meta = tmp_path / "run" / "checkpoints" / "20" / "meta"
    step_meta.mkdir(parents=True)
    json.dump({"format": TRAIN_FORMAT, "model": meta["model"]}, open(step_meta / "metadata", "w"))
    assert resumed_attention_layout(str(tmp_path / "run"), config) == old
    assert resumed_attention_layout(str(tmp_path / "new_run"), config) == config


def _run_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t5lite: error: ") and "\n" not in err and match in err, err


def test_not_an_hf_directory(tmp_path, capsys):
    _run_error(["convert", "from-hf", "--hf_dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys,
               "is not an HF T5 checkpoint directory")
    assert not (tmp_path / "o").exists()


def test_missing_tensor_and_bad_shape(hf_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    tensors = dict(read_safetensors(str(broken)))
    del tensors["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    write_safetensors({k: np.array(v) for k, v in tensors.items()}, str(broken / "model.safetensors"))
    _run_error(["convert", "from-hf", "--hf_dir", str(broken), "--out", str(tmp_path / "o")], capsys,
               "'decoder.block.1.layer.2.DenseReluDense.wo.weight' is missing")

    with open(broken / "config.json") as f:
        cfg = json.load(f)
    shutil.copy(os.path.join(hf_dir, "model.safetensors"), broken / "model.safetensors")
    cfg["d_ff"] = 48
    with open(broken / "config.json", "w") as f:
        json.dump(cfg, f)
    _run_error(["convert", "from-hf", "--hf_dir", str(broken), "--out", str(tmp_path / "o")], capsys,
               "does not match config.json")
    assert not (tmp_path / "o").exists()


def test_refuses_to_overwrite_and_rejects_non_checkpoints(hf_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    _run_error(["convert", "from-hf", "--hf_dir", hf_dir, "--out", str(tmp_path / "full")], capsys, "not empty")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    _run_error(["convert", "to-hf", "--checkpoint", hf_dir, "--out", str(tmp_path / "o")], capsys,
               "not a t5lite params checkpoint")
    assert not (tmp_path / "o").exists()


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "t5lite")
    out = subprocess.run([exe, "convert", "--help"], capture_output=True, text=True, check=True).stdout
    assert "from-hf" in out and "to-hf" in out
