"""Pluggable losses and knowledge distillation: the loss against NumPy, its limits (student = teacher,
alpha = 0), the real `train` entry with a teacher of another size, one-line errors, sequence-level data."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from t5lite.cli import main
from t5lite.errors import UserError
from t5lite.model import DecoderOnly, EncoderDecoder, get_config, init_params
from t5lite.train import losses, step
from t5lite.train.checkpoint import save_params
from t5lite.train.state import TrainState
from tests.test_safety import _one_line_error
from tests.test_step import make_batch


# ---------------------------------------------------------------------------------------------
# The loss itself.
# ---------------------------------------------------------------------------------------------

def numpy_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def numpy_distillation(student, teacher, targets, weights, alpha, temperature, z_loss):
    """Hinton et al.'s loss in float64: (1 - a) CE + a T^2 KL(p_T || q_T) + z logZ^2, summed over weighted tokens."""
    log_q1 = numpy_log_softmax(student)
    ce = -np.take_along_axis(log_q1, targets[..., None], -1)[..., 0]  # [B, T]
    log_z = np.log(np.exp(student.astype(np.float64)).sum(-1))
    log_p, log_q = numpy_log_softmax(teacher / temperature), numpy_log_softmax(student / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)  # [B, T]
    total = (1 - alpha) * ce + alpha * temperature ** 2 * kl + z_loss * log_z ** 2
    return dict(loss=(total * weights).sum(), ce=(ce * weights).sum(), kl=(kl * weights).sum())


def test_distillation_loss_matches_numpy_on_padded_random_logits():
    rng = np.random.RandomState(0)
    student = (3 * rng.randn(3, 6, 13)).astype(np.float32)  # [B, T, V]
    teacher = (3 * rng.randn(3, 6, 13)).astype(np.float32)
    targets = rng.randint(1, 13, (3, 6)).astype(np.int32)
    weights = (rng.rand(3, 6) > 0.3).astype(np.float32)  # padding: weight 0
    weights[0, -2:] = 0
    batch = dict(decoder_target_tokens=targets, decoder_loss_weights=weights)
    for alpha, temperature, z_loss in [(0.5, 2.0, 1e-3), (1.0, 1.0, 0.0), (0.3, 4.0, 0.0)]:
        loss = losses.make("distillation", {"alpha": alpha, "temperature": temperature}, z_loss=z_loss)
        got = loss(student, batch, teacher)
        want = numpy_distillation(student, teacher, targets, weights, alpha, temperature, z_loss)
        np.testing.assert_allclose(float(got["loss"]), want["loss"], rtol=1e-5)
        np.testing.assert_allclose(float(got["distill/kl"]), want["kl"], rtol=1e-5)
        np.testing.assert_allclose(float(got["distill/ce"]), want["ce"], rtol=1e-5)
        assert float(got["weight_sum"]) == weights.sum()
    # Padding changes nothing: garbage logits at weight-0 positions do not count.
    noisy = student.copy()
    noisy[weights == 0] = 100.0
    a = losses.make("distillation", {"temperature": 2.0})(student, batch, teacher)
    b = losses.make("distillation", {"temperature": 2.0})(noisy, batch, teacher)
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-6)


def test_kl_gradient_is_hintons_closed_form():
    """d (a T^2 KL) / d student = a T (softmax(student/T) - softmax(teacher/T)) per weighted token."""
    rng = np.random.RandomState(1)
    student, teacher = rng.randn(2, 3, 7).astype(np.float32), rng.randn(2, 3, 7).astype(np.float32)
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    batch = dict(decoder_target_tokens=np.ones((2, 3), np.int32), decoder_loss_weights=weights)
    alpha, temperature = 1.0, 3.0
    loss = losses.make("distillation", {"alpha": alpha, "temperature": temperature})
    grad = jax.grad(lambda s: loss(s, batch, teacher)["loss"])(student)
    want = alpha * temperature * (np.exp(numpy_log_softmax(student / temperature))
                                  - np.exp(numpy_log_softmax(teacher / temperature))) * weights[..., None]
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_loss_registry_errors_are_one_line():
    with pytest.raises(UserError, match="did you mean distillation"):
        losses.make("distilation")
    with pytest.raises(UserError, match=r"alpha.*\[0.0, 1.0\]"):
        losses.make("distillation", {"alpha": 1.5})
    with pytest.raises(UserError, match="temperature"):
        losses.make("distillation", {"temperature": 0})
    with pytest.raises(UserError, match="'cross_entropy' has no setting 'alpha'"):
        losses.make("cross_entropy", {"alpha": 0.5})
    with pytest.raises(UserError, match="train.z_loss"):
        losses.make("distillation", {"z_loss": 0.1})
    with pytest.raises(UserError, match="must be a dict"):
        losses.make("distillation", [("alpha", 0.5)])


# ---------------------------------------------------------------------------------------------
# The loss inside the train step.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny")
    return config, EncoderDecoder(config), jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))


def _prefix_lm_batch(config, seed):
    """A decoder-only prefix-LM batch: each row's first 4 positions are the (bidirectional) prefix."""
    batch = make_batch(config, seed=seed)
    prefix = np.zeros_like(batch["decoder_target_tokens"])
    prefix[:, :4] = 1
    return dict(decoder_input_tokens=batch["decoder_input_tokens"], decoder_causal_attention=prefix,
                decoder_target_tokens=batch["decoder_target_tokens"],
                decoder_loss_weights=batch["decoder_loss_weights"] * (1 - prefix))


@pytest.mark.parametrize("decoder_only", [False, True], ids=["encoder_decoder", "decoder_only"])
def test_student_equal_to_teacher_has_zero_kl_and_zero_gradient(tiny, decoder_only):
    """alpha = 1, T = 1, no z-loss: the loss is the KL alone, 0 with a minimum (zero gradient) at the teacher."""
    config = get_config("tiny", decoder_only_prefix_lm=decoder_only)
    model = DecoderOnly(config) if decoder_only else EncoderDecoder(config)
    params = init_params(config, jax.random.key(0), decoder_only) if decoder_only else tiny[2]
    batch = _prefix_lm_batch(config, seed=3) if decoder_only else make_batch(config, seed=3)
    loss_fn = losses.make("distillation", {"alpha": 1.0, "temperature": 1.0})
    grads, sums = jax.jit(lambda p, b, teacher_params: step.compute_grads(
        p, b, jax.random.key(0), model=model, loss_fn=loss_fn, teacher=(model, teacher_params)))(params, batch, params)
    assert float(sums["weight_sum"]) > 0
    assert abs(float(sums["loss"])) < 1e-4 and abs(float(sums["distill/kl"])) < 1e-4, sums
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-5


def _sgd_step(model, teacher_model=None, **kwargs):
    """A jitted train step (state, batch[, teacher_params]) with SGD at lr 1: new params = params - grads."""
    optimizer = optax.sgd(1.0)

    def train(state, batch, *teacher_params):
        return step.train_step(state, batch, *teacher_params, model=model, optimizer=optimizer,
                               teacher_module=teacher_model if teacher_params else None, **kwargs)

    return optimizer, jax.jit(train)


def test_alpha_zero_is_cross_entropy_and_microbatches_give_the_same_update():
    """The teacher (another config) only enters through the KL: with alpha = 0 the update is plain CE
    (z-loss and label smoothing included); with alpha = 0.5, 4 microbatches give one batch's update."""
    config = get_config("tiny", num_encoder_layers=1, num_decoder_layers=1)  # 4 steps to compile: keep them small
    model, params = EncoderDecoder(config), init_params(config, jax.random.key(0))
    teacher_config = get_config("tiny", emb_dim=32, num_decoder_layers=1)
    teacher_model, teacher_params = EncoderDecoder(teacher_config), init_params(teacher_config, jax.random.key(1))
    batch = make_batch(config, seed=4)
    ce = dict(z_loss=1e-3, label_smoothing=0.1)
    optimizer, plain = _sgd_step(model, loss=losses.make("cross_entropy", **ce))
    state = TrainState.create(params, optimizer)
    want, want_metrics = plain(state, batch)
    _, distill_zero = _sgd_step(model, teacher_model, num_microbatches=2,
                                loss=losses.make("distillation", {"alpha": 0.0, "temperature": 2.0}, **ce))
    got, metrics = distill_zero(state, batch, teacher_params)
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-6)
    assert float(metrics["distill/kl"]) > 0.01  # the teacher disagrees; alpha = 0 ignores it
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))

    kd = dict(loss=losses.make("distillation", {"alpha": 0.5, "temperature": 2.0}, **ce))
    one, m1 = _sgd_step(model, teacher_model, num_microbatches=1, **kd)[1](state, batch, teacher_params)
    four, m4 = _sgd_step(model, teacher_model, num_microbatches=4, **kd)[1](state, batch, teacher_params)
    for name in ("loss", "z_loss", "distill/kl", "distill/ce", "grad_norm", "accuracy"):
        np.testing.assert_allclose(m1[name], m4[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(m1["loss"], 0.5 * m1["distill/ce"] + 0.5 * 4 * m1["distill/kl"] + m1["z_loss"],
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))
    with pytest.raises(UserError, match="needs teacher"):
        step.train_step(state, batch, model=model, optimizer=optimizer, loss=losses.make("distillation"))


def test_auxiliary_losses_add_to_the_distillation_loss():
    """A student whose modules sow auxiliary losses (MoE-style): the step differentiates distillation + aux,
    reports both; the teacher's own sown values are ignored (it is frozen, no loss of its own)."""
    from tests.test_aux_losses import _ToyModel, _batch
    model, batch = _ToyModel(), _batch()
    params = model.init(jax.random.key(0), **batch)["params"]
    teacher_params = model.init(jax.random.key(1), **batch)["params"]
    kd = losses.make("distillation", {"alpha": 0.5, "temperature": 2.0})
    teacher_logits = model.apply({"params": teacher_params}, **batch)

    def total(p):  # by hand: the distillation loss (per weighted token) plus every sown value
        logits, sown = model.apply({"params": p}, **batch, mutable=["aux_loss"])
        sums = kd(logits, batch, teacher_logits)
        return sums["loss"] / sums["weight_sum"] + step.aux_losses(sown["aux_loss"])["aux_loss"], sums

    (want_loss, want_sums), want_grads = jax.value_and_grad(total, has_aux=True)(params)
    optimizer = optax.sgd(1.0)
    new_state, metrics = _sgd_step(model, model, loss=losses.make("distillation", {"alpha": 0.5, "temperature": 2.0},
                                                                  z_loss=0.0))[1](TrainState.create(params, optimizer),
                                                                                  batch, teacher_params)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill/kl"], want_sums["distill/kl"] / want_sums["weight_sum"], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"] - metrics["aux_loss"],
                               want_sums["loss"] / want_sums["weight_sum"], rtol=1e-5)
    assert float(metrics["aux_loss"]) > 0.01 and "aux_loss/balance" in metrics
    for new, old, g in zip(*(jax.tree.leaves(t) for t in (new_state.params, params, want_grads))):
        np.testing.assert_allclose(new, old - g, rtol=1e-5, atol=1e-6)


def test_build_steps_takes_the_teacher_as_a_step_input_or_only_its_shapes_for_compile(tmp_path):
    """`t5lite compile` builds a distillation run without reading the teacher's arrays: its params are
    ShapeDtypeStructs laid out like the student's, and they are inputs of the traced train step."""
    from t5lite.compile.aot import abstract_batch
    from t5lite.train import partitioning
    from t5lite.train.config import TrainConfig
    from t5lite.train.run import build_steps
    config = get_config("tiny", vocab_size=512)
    teacher_config = get_config("tiny", vocab_size=512, emb_dim=32, num_decoder_layers=1)
    save_params(str(tmp_path / "teacher"), teacher_config, init_params(teacher_config, jax.random.key(1)))
    run = TrainConfig(model_dir="(compile)", task="bible_span_corruption_en_es", train_steps=1, batch_size=2,
                      feature_lengths={"inputs": 8, "targets": 8}, optimizer="adafactor", schedule="constant",
                      learning_rate=0.01, warmup_steps=0, loss="distillation",
                      teacher_checkpoint=str(tmp_path / "teacher"))
    steps = build_steps(run, config, run.make_loss(), teacher_arrays=False)
    assert steps.teacher.config.emb_dim == 32
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(steps.teacher.params))
    state = partitioning.abstract_train_state(config, steps.optimizer, steps.shardings)
    batch = abstract_batch(2, {"inputs": 8, "targets": 8}, steps.mesh, steps.rules)
    traced = steps.train_step.trace(state, batch)
    n_inputs = sum(len(jax.tree.leaves(t)) for t in (state, batch, steps.teacher.params))
    assert len(traced.jaxpr.in_avals) == n_inputs  # the teacher's params are inputs, not constants
    loaded = build_steps(run, config, run.make_loss()).teacher  # a training run reads them, laid out alike
    assert jax.tree.map(lambda x: x.sharding, loaded.params) == steps.teacher.shardings


# ---------------------------------------------------------------------------------------------
# Through the CLI and the real `train` entry: a tiny student, a teacher of another tiny config.
# ---------------------------------------------------------------------------------------------

EN_ES = ["--gin_file=experiments/models/tiny.gin", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
         "--gin.train.progress='off'", "--gin.train.log_period=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny en->es model, wider than the student (emb_dim 96), trained for 4 steps."""
    model_dir = tmp_path_factory.mktemp("distill") / "teacher"
    assert main(["train", "--gin_file=experiments/demo/finetune_en_es_scratch.gin", *EN_ES, f"--model_dir={model_dir}",
                 "--gin.T5Config.emb_dim=96", "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=4"]) == 0
    return model_dir


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distill_train_runs_the_experiment_and_its_checkpoint_infers(teacher, tmp_path, capsys):
    student = tmp_path / "student"
    assert main(["distill", "train", "--gin_file=experiments/distill/en_es_token.gin", *EN_ES,
                 f"--model_dir={student}", f"--teacher={teacher}", "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_PERIOD=3",
                 "--gin.EVAL_PERIOD=3", "--gin.train.eval_batches=1", "--gin.train.num_microbatches=2"]) == 0
    train_lines = [r for r in _records(student / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3]
    for r in train_lines:  # the logged loss is the distillation loss, with its parts
        assert r["distill/kl"] > 0
        np.testing.assert_allclose(r["loss"], 0.5 * r["distill/ce"] + 0.5 * r["distill/kl"] + r["z_loss"], rtol=1e-4)
    assert any("eval/loss" in r for r in _records(student / "metrics.jsonl"))
    config_text = " ".join((student / "config.gin").read_text().replace("\\\n", " ").split())  # gin wraps long lines
    assert f"train.teacher_checkpoint = '{teacher}'" in config_text
    capsys.readouterr()
    (tmp_path / "in.txt").write_text("translate English to Spanish: In the beginning.\n")
    assert main(["infer", "--checkpoint", str(student), "--input", str(tmp_path / "in.txt"), "--output",
                 str(tmp_path / "out.jsonl"), "--max_decode_length", "5"]) == 0
    assert len(_records(tmp_path / "out.jsonl")) == 1


def test_teacher_mistakes_are_one_line_before_anything_is_written(teacher, tmp_path, capsys):
    other_vocab = tmp_path / "vocab512"
    config = get_config("tiny")  # vocab_size 512, the student has 8192
    save_params(str(other_vocab), config, init_params(config, jax.random.key(0)))
    model_dir = tmp_path / "never"
    run = ["--gin_file=experiments/distill/en_es_baseline.gin", *EN_ES, f"--model_dir={model_dir}"]
    _one_line_error(["distill", "train", *run, f"--teacher={tmp_path / 'missing'}"], capsys, "does not exist")
    _one_line_error(["distill", "train", *run, f"--teacher={other_vocab}"], capsys,
                    "vocab_size 512 but the student has 8192")
    _one_line_error(["train", *run, "--gin.train.loss='distillation'"], capsys, "learns from a teacher")
    _one_line_error(["train", *run, f"--gin.train.teacher_checkpoint='{teacher}'"], capsys, "uses no teacher")
    _one_line_error(["distill", "train", *run, f"--teacher={teacher}", "--gin.train.loss_kwargs={'alpha': 2}"],
                    capsys, "alpha")
    _one_line_error(["distill", "train", *run, f"--teacher={teacher}", "--gin.train.decoder_only=True",
                     "--gin.T5Config.decoder_only_prefix_lm=True"], capsys, "teacher", "encoder-decoder")
    assert not model_dir.exists()


def test_make_data_writes_one_teacher_output_per_input_and_a_task_over_them(teacher, tmp_path, capsys):
    from t5lite.data import tasks
    out = tmp_path / "teacher_en_es.jsonl"
    flags = ["--teacher", str(teacher), "--task", "bible_translate_en_es", "--split", "validation",
             "--max_examples", "5", "--batch_size", "4", "--max_decode_length", "6", "--name", "en_es_by_teacher"]
    capsys.readouterr()
    assert main(["distill", "make-data", *flags, "--out", str(out)]) == 0
    assert "distilled/text_to_text_task.name = 'en_es_by_teacher'" in capsys.readouterr().out
    pairs = _records(out)
    originals = tasks.get("bible_translate_en_es").eval_examples("validation", max_examples=5)
    assert [p["inputs"] for p in pairs] == [ex["inputs_pretokenized"] for ex in originals]
    assert all(isinstance(p["targets"], str) and p["score"] <= 0 for p in pairs)
    made = tasks.get("en_es_by_teacher").eval_examples("validation")
    assert [ex["targets_pretokenized"] for ex in made] == [p["targets"] for p in pairs]
    assert [ex["inputs_pretokenized"] for ex in made] == [p["inputs"] for p in pairs]  # no second prefix
    # Deterministic: the same command gives the same outputs (here as TSV).
    assert main(["distill", "make-data", *flags, "--out", str(tmp_path / "again.tsv")]) == 0
    rows = [line.split("\t") for line in (tmp_path / "again.tsv").read_text().splitlines()]
    assert rows == [[p["inputs"], p["targets"]] for p in pairs]
    _one_line_error(["distill", "make-data", *flags, "--out", str(tmp_path / "x.txt")], capsys, ".jsonl or .tsv")


# ---------------------------------------------------------------------------------------------
# Does it help? A student with a teacher vs the same student without, same data, steps and seed.
# ---------------------------------------------------------------------------------------------

COMPARE = dict(task="bible_translate_en_es", batch_size=16, feature_lengths={"inputs": 48, "targets": 48},
               model="tiny", schedule="constant", learning_rate=0.01, warmup_steps=0, log_period=50, progress="off",
               eval_batches=4, keep_checkpoints=1)
SMALL_STUDENT = dict(vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1,
                     num_decoder_layers=1)


def _eval_loss(model_dir) -> float:
    return [r for r in _records(model_dir / "metrics.jsonl") if "eval/loss" in r][-1]["eval/loss"]


@pytest.mark.slow
def test_distilled_student_reaches_a_lower_held_out_loss_than_without_teacher(tmp_path):
    """Teacher: tiny (d_model 64, 2+2 layers), 300 steps. Students: d_model 32, 1+1 layers, 100 steps each.
    Measured (2 CPU cores, 2026-12): teacher 4.865, student 5.794 alone, 5.670 with alpha 0.5, T 1."""
    from t5lite.train.trainer import TrainConfig, train
    train(TrainConfig(model_dir=str(tmp_path / "teacher"), train_steps=300, checkpoint_period=300, eval_period=300,
                      model_overrides={"vocab_size": 8192}, **COMPARE))
    student = dict(train_steps=100, checkpoint_period=100, eval_period=100, model_overrides=SMALL_STUDENT, **COMPARE)
    train(TrainConfig(model_dir=str(tmp_path / "alone"), **student))
    train(TrainConfig(model_dir=str(tmp_path / "taught"), loss="distillation",
                      loss_kwargs={"alpha": 0.5, "temperature": 1.0}, teacher_checkpoint=str(tmp_path / "teacher"),
                      **student))
    teacher, alone, taught = (_eval_loss(tmp_path / d) for d in ("teacher", "alone", "taught"))
    print(f"held-out loss: teacher {teacher:.3f}, student alone {alone:.3f}, with distillation {taught:.3f}")
    assert teacher < taught < alone - 0.05, (teacher, alone, taught)


# ---------------------------------------------------------------------------------------------
# Sharded: the teacher laid out by the student's rules on 8 simulated devices (a subprocess).
# ---------------------------------------------------------------------------------------------

def _sharded_runs(teacher_dir: str, meshes) -> dict:
    """Three distillation steps (2 microbatches) on each mesh; the teacher loaded from `teacher_dir`."""
    from t5lite.data.tasks import default_vocabulary
    from t5lite.train import partitioning
    from t5lite.train.optimizers import make_optimizer
    from t5lite.train.teacher import load_teacher, teacher_config

    config = get_config("tiny", vocab_size=512)
    optimizer = make_optimizer("adafactor", "constant", 0.01, 0)
    batches = [make_batch(config, seed=s) for s in range(3)]
    out = {}
    for shape in meshes:
        mesh = partitioning.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        rules = partitioning.rules_for(mesh)
        shardings = partitioning.state_shardings(config, optimizer, mesh, rules)
        state = partitioning.init_train_state(config, optimizer, mesh, rules, jax.random.key(0))
        teacher = load_teacher(teacher_dir, teacher_config(teacher_dir, config, False, default_vocabulary()), False,
                               mesh, rules)
        train = step.make_train_step(EncoderDecoder(config), optimizer, mesh, rules, shardings, teacher=teacher,
                                     loss=losses.make("distillation", {"alpha": 0.5, "temperature": 2.0}),
                                     num_microbatches=2)
        losses_ = []
        for batch in batches:
            state, metrics = train(state, partitioning.global_batch_from_local(batch, mesh, rules))
            losses_.append(float(metrics["loss"]))
        wi = teacher.params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
        out["x".join(map(str, shape))] = dict(
            losses=losses_, wi_0_spec=list(wi.sharding.spec), wi_0_shard=list(wi.addressable_shards[0].data.shape),
            teacher_alive=not any(x.is_deleted() for x in jax.tree.leaves(teacher.params)))
    return out


@pytest.mark.slow  # two meshes to compile, in a subprocess with 8 simulated devices
def test_teacher_is_sharded_like_the_student_and_8_devices_match_one(tmp_path):
    from tests.test_sharding import XLA_FLAGS
    teacher_config = get_config("tiny", vocab_size=512, emb_dim=32, mlp_dim=64, num_decoder_layers=1)
    save_params(str(tmp_path / "teacher"), teacher_config, init_params(teacher_config, jax.random.key(1)))
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.test_distillation", str(tmp_path / "teacher")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, eight = result["1x1x1"], result["2x2x2"]
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    assert eight["wi_0_spec"] == ["fsdp", "tensor"]  # [embed, mlp], as the student's wi_0
    assert eight["wi_0_shard"] == [16, 32]  # 1/(fsdp * tensor) of the teacher's [32, 64]
    assert one["teacher_alive"] and eight["teacher_alive"]  # never donated: usable step after step


if __name__ == "__main__":
    print(json.dumps(_sharded_runs(sys.argv[1], [(1, 1, 1), (2, 2, 2)])))
