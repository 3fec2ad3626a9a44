"""Every gin file in experiments/ parses and builds its model (jax.eval_shape: no memory), so configs cannot rot."""

import glob
import os

import pytest

from t5lite import gin_utils
from t5lite.model import PRESETS, abstract_params, count_params, get_config

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
GIN_FILES = sorted(glob.glob(os.path.join(ROOT, "**", "*.gin"), recursive=True))


def test_there_is_a_model_file_per_preset():
    assert {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(ROOT, "models", "*.gin"))} == set(PRESETS)


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_gin_file_parses_and_builds_its_model(path):
    gin_utils.parse([path], model_dir="/tmp/unused")
    config = gin_utils.model_config()
    assert count_params(abstract_params(config)) > 0
    name = os.path.basename(path)[:-4]
    if os.path.dirname(path).endswith("models") and name != "tiny":
        assert config == get_config(name)


def test_tiny_overrides_the_model_of_any_run_file():
    gin_utils.parse([os.path.join(ROOT, "demo", "pretrain.gin"), os.path.join(ROOT, "models", "tiny.gin")])
    assert gin_utils.model_config() == get_config("tiny", vocab_size=8192)
