"""A user's own objective, optimizer, schedule, loss and metric, each added from a file of their own through the one
registry (t5lite/registry.py) and selected by gin lines: no edit to t5lite. The run trains through `t5lite train`.
"""

import json
import sys

import jax
import numpy as np
import pytest

from t5lite import registry
from t5lite.cli import main
from t5lite.errors import UserError
from t5lite.model import init_params
from t5lite.train.checkpoint import load_train_checkpoint_params

USER_MODULE = '''
import dataclasses

import jax.numpy as jnp
import optax

from t5lite.data import preprocessors as P
from t5lite.registry import register
from t5lite.train import losses

CALLS = {"objective": 0, "optimizer": 0, "schedule": 0, "loss": 0}


@register("objective", "echo_words")
def echo_words(text_key="text", max_words=6):
    """Inputs: the first words of a document; targets: the same words (an autoencoder)."""
    CALLS["objective"] += 1

    def build(vocab, feature_lengths):
        def first_words(example, rng):
            words = " ".join(example[text_key].split()[:max_words])
            return {"inputs": words, "targets": words}
        return [first_words, lambda ex, rng: P.tokenize(ex, vocab),
                lambda ex, rng: P.append_eos(ex, vocab.eos_id, lengths=feature_lengths)]
    return build


@register("schedule", "halving")
def halving(learning_rate, warmup_steps):
    CALLS["schedule"] += 1
    return lambda step: learning_rate * 0.5 ** jnp.floor(jnp.asarray(step, jnp.float32) / 2)


@register("optimizer", "sign_sgd")
def sign_sgd(learning_rate_fn):
    """Every parameter moves by exactly lr * sign(gradient)."""
    CALLS["optimizer"] += 1
    return optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(learning_rate_fn))


@register("loss", "scaled_cross_entropy")
@dataclasses.dataclass(frozen=True)
class ScaledCrossEntropy(losses.CrossEntropy):
    scale: float = 1.0

    def __call__(self, logits, batch, teacher_logits=None):
        CALLS["loss"] += 1
        sums = super().__call__(logits, batch, teacher_logits)
        return {**sums, "loss": sums["loss"] * self.scale, "user/unscaled": sums["loss"]}


@register("metric", "first_char_match")
def first_char_match(targets, predictions):
    return {"first_char_match": 100.0 * sum(t[:1] == p[:1] for t, p in zip(targets, predictions)) / len(targets)}
'''

RUN_GIN = '''
import my_extensions
include 'demo/pretrain.gin'
echo/objective_task.name = 'echo_verses'
echo/objective_task.objective = 'echo_words'
echo/objective_task.corpus_task = 'bible_span_corruption_en'
echo/objective_task.max_words = 4
MIXTURE_OR_TASK_NAME = @echo/objective_task()
TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 16}
train.optimizer = 'sign_sgd'
train.schedule = 'halving'
train.learning_rate = 0.001
train.loss = 'scaled_cross_entropy'
train.loss_kwargs = {'scale': 2.0}
train.z_loss = 0.0
'''


@pytest.fixture
def user_dir(tmp_path):
    (tmp_path / "my_extensions.py").write_text(USER_MODULE)
    (tmp_path / "my_run.gin").write_text(RUN_GIN)
    yield tmp_path
    sys.modules.pop("my_extensions", None)
    for entries in registry._ENTRIES.values():  # later tests in this process see t5lite's own entries only
        for name in [n for n, entry in entries.items() if getattr(entry, "__module__", "") == "my_extensions"]:
            del entries[name]


@pytest.mark.slow
def test_user_objective_optimizer_schedule_and_loss_train_from_gin(user_dir):
    model_dir = user_dir / "run"
    common = [f"--gin_file={user_dir / 'my_run.gin'}", "--gin_file=experiments/models/tiny.gin",
              "--gin.BATCH_SIZE=4", "--gin.train.log_period=1", "--gin.train.progress='off'"]
    assert main(["train", *common, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=3"]) == 0
    calls = sys.modules["my_extensions"].CALLS
    assert calls["objective"] >= 1 and calls["optimizer"] >= 1 and calls["schedule"] >= 1 and calls["loss"] >= 1
    lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(line["loss"] > 0 for line in lines)
    # the user's loss: its extra term is reported, and the differentiated loss is twice it
    assert all(line["user/unscaled"] == pytest.approx(line["loss"] / 2, rel=1e-5) for line in lines)
    # the user's schedule: 1e-3 for steps 0-1, 5e-4 for step 2
    assert [line["learning_rate"] for line in lines] == pytest.approx([1e-3, 1e-3, 5e-4])

    # the user's optimizer: from the same init, one step moves every parameter by exactly lr * sign(grad)
    one = user_dir / "one"
    assert main(["train", *common, f"--model_dir={one}", "--gin.TRAIN_STEPS=1", "--gin.CHECKPOINT_PERIOD=1"]) == 0
    _, after, _ = load_train_checkpoint_params(str(one))
    config, _, _ = load_train_checkpoint_params(str(model_dir))
    before = init_params(config, jax.random.key(0))  # RANDOM_SEED 0: the run's own init
    moved = [np.abs(np.asarray(a) - np.asarray(b)) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
    steps = np.concatenate([m.ravel() for m in moved])
    assert np.all(np.isclose(steps, 1e-3, rtol=1e-3) | (steps == 0))
    assert np.mean(steps > 0) > 0.5


def test_user_metric_is_named_by_a_task_and_typos_list_the_registered_names(user_dir):
    sys.path.insert(0, str(user_dir))
    try:
        import my_extensions  # noqa: F401  (registers its entries)
    finally:
        sys.path.remove(str(user_dir))
    from t5lite import metrics
    assert metrics.compute(["first_char_match"], ["abc", "xyz"], ["ab", "yz"]) == {"first_char_match": 50.0}
    assert "echo_words" in registry.names("objective") and "sign_sgd" in registry.names("optimizer")
    with pytest.raises(UserError, match=r"unknown optimizer 'sign_sdg'; choose from .*sign_sgd; did you mean sign_sgd\? \(set by train.optimizer"):
        registry.get("optimizer", "sign_sdg")
    with pytest.raises(UserError, match="unknown kind"):
        registry.register("widget", "x")
