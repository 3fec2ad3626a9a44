"""The objectives' run files (UL2, prefix / causal LM, decoder-only, instruction tuning): the
equal-FLOPs comparison holds, and each file trains end to end on the tiny model."""

import json
import math
import os

import gin
import pytest

from t5lite import gin_utils
from t5lite.cli import main
from t5lite.train.monitor import model_flops_per_step

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def flops_per_step(run_file: str) -> float:
    """model_flops_per_step for the model, batch, lengths and architecture a run file binds."""
    gin_utils.parse([os.path.join(ROOT, run_file)])
    lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
    try:
        decoder_only = gin.query_parameter("train.decoder_only")
    except ValueError:
        decoder_only = False
    return model_flops_per_step(gin_utils.model_config(), gin.query_parameter("%BATCH_SIZE"),
                                lengths.get("inputs", 0), lengths["targets"], decoder_only=decoder_only)


def test_encoder_decoder_and_decoder_only_comparison_is_at_equal_flops():
    encoder_decoder = flops_per_step("ablations/objective_prefix_lm.gin")
    assert encoder_decoder == pytest.approx(76.50e9, rel=1e-3)  # the arithmetic in the gin file comments
    for run_file in ("ablations/arch_decoder_only.gin", "ablations/arch_decoder_only_clm.gin"):
        assert flops_per_step(run_file) == pytest.approx(encoder_decoder, rel=0.01), run_file


@pytest.mark.slow
@pytest.mark.parametrize("run_file", ["ablations/objective_ul2.gin", "ablations/arch_decoder_only.gin",
                                      "ablations/arch_decoder_only_clm.gin", "instruct/train.gin"])
def test_run_file_trains_on_the_tiny_model(run_file, tmp_path):
    model_dir = tmp_path / "run"
    assert main(["train", f"--gin_file={os.path.join(ROOT, run_file)}", f"--gin_file={ROOT}/models/tiny.gin",
                 f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=2", "--gin.INITIAL_CHECKPOINT_PATH=None",
                 "--gin.train.log_period=1", "--gin.train.progress='off'"]) == 0
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
