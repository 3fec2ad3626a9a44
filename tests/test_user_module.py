"""README "Add a module": the example, written to a temporary directory, trains through `t5lite train` by gin only."""

import json
import os
import re

import numpy as np
import pytest

from t5lite.cli import main
from t5lite.train.checkpoint import load_train_checkpoint_params

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_example():
    """(my_attention.py source, my_run.gin text) from the README's "Add a module" section."""
    section = open(README, encoding="utf-8").read().split("### Add a module", 1)[1]
    python, gin_text = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    assert python.startswith("# my_attention.py") and gin_text.startswith("# my_run.gin")
    return python, gin_text


@pytest.mark.slow
def test_readme_module_is_selected_by_gin_and_trains(tmp_path):
    python, gin_text = _readme_example()
    (tmp_path / "my_attention.py").write_text(python)
    (tmp_path / "my_run.gin").write_text(gin_text)
    model_dir = tmp_path / "run"
    assert main(["train", f"--gin_file={tmp_path / 'my_run.gin'}", "--gin_file=experiments/models/tiny.gin",
                 f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=4",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.train.log_period=1",
                 "--gin.train.progress='off'"]) == 0
    losses = [json.loads(line)["loss"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    config, params, _ = load_train_checkpoint_params(str(model_dir))
    assert config.attention == "cosine"
    log_scale = params["encoder"]["layers_0"]["attention"]["log_scale"]  # the module's own parameter, trained
    assert log_scale.shape == (4,) and not np.allclose(log_scale, np.log(10.0), rtol=0, atol=1e-7)
