"""Test-session setup shared by every test process.

All of them (pytest-xdist workers and the CLI subprocesses tests start, which inherit the
environment) share one persistent XLA compilation cache under .pytest_cache: the suite
compiles the same tiny-model programs many times, and a cache hit skips XLA's compile.
"""

import os

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import hashlib  # noqa: E402 - the cache variables above must be set before anything imports jax

import pytest  # noqa: E402

QUICK = ["--gin_file=experiments/demo/pretrain.gin", "--gin_file=experiments/models/tiny.gin",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.train.log_period=1",
         "--gin.train.progress='off'", "--gin.EVAL_PERIOD=None"]
CARD_RUN = ["--gin_file=experiments/finetune/lora_en_es.gin", "--gin_file=experiments/models/tiny.gin",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}", "--gin.EVAL_PERIOD=None",
            "--gin.train.progress='off'", "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2"]


def tree_digest(path) -> str:
    """Hash of every file name and content under `path` (what a failed command must not change)."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def cli_runs(tmp_path_factory):
    """Made once per test process for the CLI fault tests and the fuzzer: a tiny params checkpoint (base), a
    2-step training run (trained), a 2-step LoRA card run on base (card_run) and a 2-line input (in.txt)."""
    import jax

    from t5lite.cli import main
    from t5lite.model import get_config, init_params
    from t5lite.train.checkpoint import save_params
    root = tmp_path_factory.mktemp("cli_runs")
    config = get_config("tiny", vocab_size=8192)
    save_params(str(root / "base"), config, jax.jit(lambda k: init_params(config, k))(jax.random.key(0)))
    assert main(["train", *QUICK, f"--model_dir={root / 'trained'}", "--gin.TRAIN_STEPS=2",
                 "--gin.CHECKPOINT_PERIOD=2"]) == 0
    assert main(["finetune", *CARD_RUN, f"--model_dir={root / 'card_run'}", f"--init_checkpoint={root / 'base'}"]) == 0
    (root / "in.txt").write_text("translate English to Spanish: God is love.\nHello.\n")
    return root
