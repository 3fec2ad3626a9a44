"""Monitor: FLOP counts against XLA and a hand count, peak lookup, JSONL / TensorBoard / progress output."""

import glob
import json
import logging
import math
import os
import struct
import sys

import jax
import jax.numpy as jnp
import pytest

from t5lite.model import DecoderOnly, EncoderDecoder, T5Config, get_config, init_params
from t5lite.train import monitor
from t5lite.train.monitor import PEAK_FLOPS, Monitor, model_flops_per_step, peak_flops_per_device, plot_metrics


# ---------------------------------------------------------------------------------------------
# FLOPs.
# ---------------------------------------------------------------------------------------------

def _toy(**kw):
    return T5Config(vocab_size=10, emb_dim=4, num_heads=2, head_dim=3, mlp_dim=5, num_encoder_layers=1,
                    num_decoder_layers=1, mlp_activations=("relu",), **kw)


def test_flops_closed_form_single_layer_toy():
    # D=4, heads*head_dim=6, F=5, V=10; batch 2, encoder length 3, decoder length 2. Multiply-adds per sequence:
    enc = 3 * (4 * 4 * 6)  # q, k, v, o for 3 tokens                      = 288
    enc += 3 * (4 * 5 + 5 * 4)  # wi, wo                                   = 120
    enc += 3 * 3 * 6 + 3 * 3 * 6  # Q K^T and A V over [3 x 3] scores      = 108
    dec = 2 * (4 * 4 * 6) + (2 * 2 * 6) * 2  # self-attention proj + scores/sum = 192 + 48
    dec += 2 * (2 * 4 * 6) + 3 * (2 * 4 * 6)  # cross q, o on 2 dec tokens; k, v on 3 enc tokens = 96 + 144
    dec += (2 * 3 * 6) * 2  # cross scores and sum over [2 x 3]              = 72
    dec += 2 * (4 * 5 + 5 * 4)  # MLP                                      = 80
    dec += 2 * 4 * 10  # logits                                              = 80
    assert enc + dec == 1228
    forward = 2 * 2 * (enc + dec)  # 2 FLOPs per multiply-add, batch 2
    assert model_flops_per_step(_toy(), 2, 3, 2, training=False) == forward == 4912
    assert model_flops_per_step(_toy(), 2, 3, 2) == 3 * forward
    # Gated MLP: one more [D, F] matrix per token: 5 tokens * 20 more multiply-adds.
    gated = _toy().replace(mlp_activations=("gelu", "linear"))
    assert model_flops_per_step(gated, 2, 3, 2, training=False) == forward + 2 * 2 * 5 * 20
    # Decoder-only: 5 tokens (prefix 3 + targets 2), no cross-attention.
    dec_only = 5 * (4 * 4 * 6 + 4 * 5 + 5 * 4) + 2 * 5 * 5 * 6 + 5 * 4 * 10  # 680 + 300 + 200
    assert model_flops_per_step(_toy(), 2, 3, 2, decoder_only=True, training=False) == 2 * 2 * dec_only == 4720


def test_flops_closed_form_grouped_query_attention_and_experts():
    # D=4, 2 heads x 3 -> A=6; one kv head -> Akv=3; F=5, relu; MoE: 3 experts, top-2. Per token:
    mlp = 4 * 3 + 2 * (4 * 5 + 5 * 4)  # router + 2 experts                       = 92
    proj = 2 * 4 * 6 + 2 * 4 * 3  # q, o at full width; k, v at one kv head          = 72
    enc = 3 * (proj + mlp) + 2 * 3 * 3 * 6  # 3 tokens, scores + sum               = 600
    dec = 2 * (proj + mlp) + 2 * 2 * 2 * 6  # self-attention block over 2 tokens   = 376
    dec += 2 * (2 * 4 * 6) + 3 * (2 * 4 * 3) + 2 * 2 * 3 * 6  # cross q, o; k, v of 3 encoder tokens; scores = 240
    logits = 2 * 4 * 10  # = 80
    cfg = _toy(num_kv_heads=1, mlp="moe", num_experts=3, experts_per_token=2)
    assert model_flops_per_step(cfg, 2, 3, 2, training=False) == 2 * 2 * (enc + dec + logits) == 2 * 2 * 1296
    # MoE only in every 2nd layer: the one layer per stack here is dense again.
    dense_mlp = 4 * 5 + 5 * 4
    assert model_flops_per_step(cfg.replace(moe_every=2), 2, 3, 2, training=False) == 2 * 2 * (
        1296 - (3 + 2) * (mlp - dense_mlp))


def test_grouped_query_flops_match_xla_cost_analysis():
    cfg = get_config("tiny", num_kv_heads=1, position_scheme="rope")
    model, params = EncoderDecoder(cfg), init_params(cfg, jax.random.key(0))
    enc, dec = jnp.ones((2, 32), jnp.int32), jnp.ones((2, 16), jnp.int32)
    forward = lambda p, e, d: model.apply({"params": p}, encoder_input_tokens=e, decoder_input_tokens=d)  # noqa: E731
    ratio = _xla_flops(forward, params, enc, dec) / model_flops_per_step(cfg, 2, 32, 16, training=False)
    assert 1.0 <= ratio < 1.1, ratio


def _xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


def test_flops_match_xla_cost_analysis():
    """XLA also counts softmax, norms and activations, so it is a little higher: within 10%."""
    cfg = get_config("tiny")
    batch, inputs, targets = 2, 32, 16
    model, params = EncoderDecoder(cfg), init_params(cfg, jax.random.key(0))
    enc, dec = jnp.ones((batch, inputs), jnp.int32), jnp.ones((batch, targets), jnp.int32)
    forward = lambda p, e, d: model.apply({"params": p}, encoder_input_tokens=e, decoder_input_tokens=d)  # noqa: E731
    ratio = _xla_flops(forward, params, enc, dec) / model_flops_per_step(cfg, batch, inputs, targets, training=False)
    assert 1.0 <= ratio < 1.1, ratio

    loss = lambda p, e, d: jnp.mean(jax.nn.log_softmax(forward(p, e, d))[..., 3])  # noqa: E731
    ratio = _xla_flops(jax.grad(loss), params, enc, dec) / model_flops_per_step(cfg, batch, inputs, targets)
    assert 1.0 <= ratio < 1.1, ratio

    cfg = cfg.replace(mlp_activations=("relu",), logits_via_embedding=True)
    model, params = DecoderOnly(cfg), init_params(cfg, jax.random.key(0), decoder_only=True)
    tokens = jnp.ones((batch, inputs + targets), jnp.int32)
    xla = _xla_flops(lambda p, t: model.apply({"params": p}, decoder_input_tokens=t), params, tokens)
    ratio = xla / model_flops_per_step(cfg, batch, inputs, targets, decoder_only=True, training=False)
    assert 1.0 <= ratio < 1.1, ratio


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("cpu", os.cpu_count() * 32 * 3.5e9),
])
def test_peak_known_kinds(kind, peak):
    assert peak_flops_per_device(kind) == peak


def test_peak_override_default_and_unknown(caplog):
    assert peak_flops_per_device("TPU v4", override=1e12) == 1e12
    assert peak_flops_per_device() == PEAK_FLOPS["cpu"]  # this machine's jax device kind is 'cpu'
    monitor._warned_kinds.discard("Mystery Accelerator 9000")
    with caplog.at_level(logging.WARNING, logger="t5lite.train.monitor"):
        assert peak_flops_per_device("Mystery Accelerator 9000") == PEAK_FLOPS["cpu"]
        assert peak_flops_per_device("Mystery Accelerator 9000") == PEAK_FLOPS["cpu"]
    warnings = [r for r in caplog.records if "Mystery Accelerator 9000" in r.getMessage()]
    assert len(warnings) == 1 and "peak_flops" in warnings[0].getMessage()


# ---------------------------------------------------------------------------------------------
# Monitor output.
# ---------------------------------------------------------------------------------------------

def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _read_scalars(run_dir):
    """{tag: [(step, value)]} from tensorboardX event files, parsed as TFRecords (no tensorboard needed)."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])  # skip the 4-byte length crc
            pos += 12 + length + 4  # and the data crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_monitor_writes_jsonl_tensorboard_and_rates(tmp_path):
    d = str(tmp_path)
    mon = Monitor(d, total_steps=100, flops_per_step=3e9, tokens_per_step=512, num_devices=2, peak_flops=1e10,
                  progress="off")
    out = mon.log(10, {"loss": 2.5, "learning_rate": 1e-3, "accuracy": 0.25}, steps_since_last=10,
                  seconds_since_last=4.0)
    # 10 steps in 4 s: 0.4 s/step, 512*10/4 tokens/s, 3e9*10/4 FLOP/s over 2 devices of 1e10.
    assert out["step_time"] == pytest.approx(0.4)
    assert out["tokens_per_sec"] == pytest.approx(1280.0)
    assert out["mfu"] == pytest.approx(7.5e9 / 2e10)
    mon.log(20, {"loss": float("nan"), "learning_rate": 1e-3, "grad_norm": float("inf")}, 10, 5.0)
    mon.log_eval(20, {"loss": 2.0, "accuracy": 0.5})
    mon.close()
    mon.close()  # idempotent

    rows = _read_jsonl(os.path.join(d, "metrics.jsonl"))  # every line is strict JSON
    assert [r["step"] for r in rows] == [10, 20, 20]
    assert rows[0]["loss"] == 2.5 and rows[0]["accuracy"] == 0.25 and rows[0]["learning_rate"] == 1e-3
    assert rows[0]["mfu"] == pytest.approx(0.375) and rows[0]["tokens_per_sec"] == pytest.approx(1280.0)
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None  # NaN / inf -> null
    assert rows[1]["tokens_per_sec"] == pytest.approx(1024.0) and rows[1]["step_time"] == pytest.approx(0.5)
    assert rows[2] == {"step": 20, "eval/loss": 2.0, "eval/accuracy": 0.5}

    train = _read_scalars(os.path.join(d, "tensorboard", "train"))
    assert train["loss"] == [(10, 2.5)] and "grad_norm" not in train  # NaN / inf are not charted
    assert train["tokens_per_sec"] == [(10, 1280.0), (20, 1024.0)]
    assert train["mfu"][0] == (10, 0.375)
    evals = _read_scalars(os.path.join(d, "tensorboard", "eval"))
    assert evals == {"loss": [(20, 2.0)], "accuracy": [(20, 0.5)]}  # bare names: overlays train/loss


def test_monitor_appends_on_resume_and_handles_zero_time(tmp_path):
    d = str(tmp_path)
    with Monitor(d, total_steps=10, progress="off") as mon:
        mon.log(1, {"loss": 3.0}, 1, 1.0)
        mon.log(2, {"loss": 2.5}, 1, 1.0)  # then killed; the checkpoint was at step 1
    with Monitor(d, total_steps=10, start_step=1, progress="off") as mon:
        out = mon.log(2, {"loss": 2.0}, 1, 0.0)  # no elapsed time: rates undefined, not a crash
        assert math.isnan(out["tokens_per_sec"]) and math.isnan(out["mfu"])
    path = os.path.join(d, "metrics.jsonl")
    rows = _read_jsonl(path)
    # The dead run's step 2 (past its checkpoint at step 1) is dropped: one line per step.
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.0)]
    assert rows[1]["mfu"] is None
    assert monitor.read_metrics(path) == ([1, 2], [3.0, 2.0])


def test_a_resume_drops_the_dead_runs_lines_past_its_checkpoint_atomically(tmp_path):
    d = str(tmp_path)
    with Monitor(d, total_steps=10, progress="off") as mon:
        for step in (2, 4, 6):
            mon.log(step, {"loss": float(step)}, 2, 1.0)
        mon.log_eval(4, {"loss": 1.0})
        mon.log_eval(6, {"loss": 1.0})
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "loss"')  # a killed writer's half line
    with Monitor(d, total_steps=10, start_step=4, progress="off") as mon:
        mon.log(6, {"loss": 0.5}, 2, 1.0)
    rows = _read_jsonl(os.path.join(d, "metrics.jsonl"))
    assert [(r["step"], r.get("loss", r.get("eval/loss"))) for r in rows] == [(2, 2.0), (4, 4.0), (4, 1.0), (6, 0.5)]
    assert sorted(os.listdir(d)) == ["metrics.jsonl", "tensorboard"]  # no temporary file left


def test_the_first_line_prints_what_is_known_and_numbers_honestly(tmp_path, capsys):
    mon = Monitor(str(tmp_path), total_steps=30, tokens_per_step=100, flops_per_step=1e9, progress="lines")
    mon.log(1, {"loss": 1.5, "learning_rate": 1e10}, 0, 0.0)  # right after compilation: nothing timed yet
    mon.log(10, {"loss": 1.5, "learning_rate": 2.5e6}, 9, 1.0)
    mon.close()
    first, second = capsys.readouterr().err.strip().splitlines()
    assert first == "step 1/30 loss 1.5 lr 1e+10", first  # was 'lr 1e+04M ... step_time nans ... mfu nan%'
    assert "lr 2.5M" in second and "step_time 0.1111s" in second and "tok/s 900" in second


def test_non_primary_writes_nothing(tmp_path, capsys):
    d = os.path.join(str(tmp_path), "run")
    mon = Monitor(d, total_steps=10, flops_per_step=1e9, tokens_per_step=10, peak_flops=1e9,
                  is_primary=False, progress="lines")
    out = mon.log(5, {"loss": 1.0}, 5, 1.0)
    mon.log_eval(5, {"loss": 1.0})
    mon.close()
    assert out["tokens_per_sec"] == 50.0 and out["mfu"] == 5.0
    assert not os.path.exists(d)
    assert capsys.readouterr().err == ""


def test_lines_mode_prints_one_line_per_log(tmp_path, capsys):
    mon = Monitor(str(tmp_path), total_steps=30, tokens_per_step=100, progress="lines")
    for step in (10, 20, 30):
        mon.log(step, {"loss": 1.5, "learning_rate": 0.01}, 10, 2.0)
    mon.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("step 10/30 loss 1.5") and "tok/s 500" in lines[0]


def test_auto_progress_is_lines_without_a_tty(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert Monitor(str(tmp_path), total_steps=1).progress == "lines"


def test_tqdm_mode(tmp_path, capsys):
    mon = Monitor(str(tmp_path), total_steps=20, tokens_per_step=100, progress="tqdm")
    mon.log(10, {"loss": 1.25}, 10, 1.0)
    assert mon._bar.n == 10
    mon.close()
    assert "loss 1.25" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------------

def test_plot_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    runs = {}
    for name, scale in (("a", 1.0), ("b", 2.0)):
        with Monitor(str(tmp_path / name), total_steps=3, progress="off") as mon:
            for step in (1, 2, 3):
                mon.log(step, {"loss": scale / step}, 1, 1.0)
        runs[name] = str(tmp_path / name / "metrics.jsonl")
    out = str(tmp_path / "plots" / "loss.png")
    plot_metrics(runs, out)
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert monitor.read_metrics(runs["b"]) == ([1, 2, 3], [2.0, 1.0, 2 / 3])


def test_plot_metrics_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_metrics({}, str(tmp_path / "x.png"))
