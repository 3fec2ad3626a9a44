"""The benchmarks run and report sane numbers (tiny shapes; speed itself is measured by `t5lite bench`)."""

import math

import numpy as np
import pytest

from t5lite.bench import data_benchmark, decode_benchmark, train_benchmark


def test_train_benchmark_alternates_processes_and_reports_throughput_and_mfu():
    row = train_benchmark("tiny", batch_size=2, input_length=16, target_length=8, steps=2, rounds=2, with_hf=True)
    step = row["step_s"]
    assert step["n"] == 4 and 0 < step["min"] <= step["median"] <= step["max"]
    assert row["tokens_per_sec"] == 2 * 24 / step["median"]
    assert 0 < row["mfu_theoretical"] < 1 and 0 < row["mfu_matmul"] and row["matmul_gflops"] > 0
    assert row["hf_step_s"]["n"] == 4 and math.isfinite(row["speedup"])


@pytest.mark.slow
def test_train_benchmark_compares_adafactor_with_hf():
    row = train_benchmark("tiny", batch_size=2, input_length=16, target_length=8, steps=1, rounds=1,
                          optimizer="adafactor", with_hf=True, overrides={"scan_layers": True})
    assert row["step_s"]["n"] == 1 and row["hf_step_s"]["n"] == 1


def test_decode_benchmark_times_t5lite_and_hf():
    rows = decode_benchmark("tiny", batch_sizes=(2,), input_length=8, max_decode_length=4, repeats=1, rounds=1)
    assert [r["case"] for r in rows] == ["batch 2 greedy", "batch 2 beam4"]
    for row in rows:
        assert row["tokens"] > 0 and row["t5lite_tok_s"] > 0 and row["hf_tok_s"] > 0


def test_data_benchmark_counts_tokens():
    result = data_benchmark(batch_size=4, input_length=64, num_batches=3)
    assert result["batches_per_s"] > 0 and result["tokens_per_s"] > 4 * 64


def test_pipeline_benchmark_counts_the_window_the_first_batch_prepares():
    """Packing prepares a window of batches on the first call: that work must be inside the timing."""
    import time

    from t5lite.data.pipeline import benchmark_pipeline

    def window_of_four():
        while True:
            time.sleep(0.2)                      # packs 4 batches at once
            for _ in range(4):
                yield {"decoder_target_tokens": np.ones((2, 8), np.int32)}

    result = benchmark_pipeline(window_of_four(), num_batches=8)
    assert result["first_batch_s"] >= 0.2
    assert result["seconds"] >= 0.4 and result["batches_per_s"] <= 8 / 0.4
    assert result["tokens_per_s"] == 8 * 16 / result["seconds"]


def test_bench_train_set_parses_config_overrides():
    from t5lite.commands import _overrides as _config_overrides
    from t5lite.errors import UserError
    assert _config_overrides(["position_scheme=rope", "num_kv_heads=2", "attention_logit_softcap=50.0",
                              "qk_norm=True", "mlp_activations=('relu',)"]) == dict(
        position_scheme="rope", num_kv_heads=2, attention_logit_softcap=50.0, qk_norm=True, mlp_activations=("relu",))
    with pytest.raises(UserError, match="FIELD=VALUE"):
        _config_overrides(["num_kv_heads"])


@pytest.mark.slow
def test_train_benchmark_takes_an_ablation():
    row = train_benchmark("tiny", batch_size=2, input_length=16, target_length=8, steps=1, rounds=1,
                          overrides={"mlp": "moe", "num_experts": 4, "num_kv_heads": 2})
    assert row["overrides"] == {"mlp": "moe", "num_experts": 4, "num_kv_heads": 2}
    assert 0 < row["mfu_theoretical"] < 1
