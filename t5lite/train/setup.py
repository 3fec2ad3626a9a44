"""A training run's pieces, built and checked before anything is written into model_dir.

`prepare(...)` takes train()'s settings and returns a `Run`: the model config, vocabulary, mesh,
optimizer, shardings, the jitted steps, the training data iterator (its first batch already
read and rewound) and an evaluator. Every user mistake found on the way is a one-line
UserError: a bad number, a task split that does not exist or cannot be read, the validation
split, a prefix-LM setting that disagrees with the features, a vocabulary larger than the
model's, an initial checkpoint of another model or vocabulary, an unknown loss or loss setting,
a distillation teacher that is missing or has another vocabulary or model kind.
"""

import base64
import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any, Callable, Dict, Optional, Sequence, Union

import jax
import numpy as np

from t5lite.data import tasks as tasks_lib
from t5lite.data.pipeline import default_num_shards
from t5lite.data.vocab import Vocabulary
from t5lite.errors import UserError
from t5lite.model import DecoderOnly, EncoderDecoder, T5Config, abstract_params, get_config
from t5lite.train import losses, partitioning
from t5lite.train.cards import CardSteps, CardTraining, build_card_steps, prepare_card_training
from t5lite.train.checkpoint import check_fits, checkpoint_meta, flat_shapes, load_any_params, stored_model
from t5lite.train.monitor import Monitor, model_flops_per_step, peak_flops_per_device
from t5lite.train.optimizers import make_optimizer
from t5lite.train.state import TrainState
from t5lite.train.step import make_eval_step, make_train_step
from t5lite.train.teacher import Teacher, abstract_teacher, check_loss_and_teacher, load_teacher, teacher_config

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Settings: types and ranges, named as the user binds them.
# ---------------------------------------------------------------------------------------------

def _integer(name: str, value, minimum: int = 1, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"train.{name} must be an integer >= {minimum}{' or None' if optional else ''}, "
                        f"got {value!r}; fix its gin binding")


def _number(name: str, value, minimum: float = 0.0, optional: bool = False, strict: bool = False) -> None:
    if value is None and optional:
        return
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and math.isfinite(value)
          and (value > minimum if strict else value >= minimum))
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise UserError(f"train.{name} must be a number {bound}{' or None' if optional else ''}, got {value!r}; "
                        "fix its gin binding")


def check_settings(*, train_steps, batch_size, seed, learning_rate, warmup_steps, num_microbatches, z_loss,
                   label_smoothing, loss_normalizing_factor, checkpoint_period, keep_checkpoints, keep_period,
                   log_period, eval_period, eval_batches, peer_timeout_s, progress) -> None:
    """Types and ranges of train()'s scalar settings (TRAIN_STEPS=2.5 or -5 must not train)."""
    _integer("train_steps (TRAIN_STEPS)", train_steps)
    _integer("batch_size (BATCH_SIZE)", batch_size)
    _integer("seed (RANDOM_SEED)", seed, minimum=0)
    if seed >= 2**32:
        raise UserError(f"train.seed (RANDOM_SEED) must be < 2**32, got {seed}")
    _number("learning_rate", learning_rate, strict=True)
    _integer("warmup_steps", warmup_steps, minimum=0)
    _integer("num_microbatches", num_microbatches)
    if batch_size % num_microbatches:
        raise UserError(f"train.num_microbatches={num_microbatches} does not divide BATCH_SIZE {batch_size}; "
                        "choose a divisor of the batch size")
    _number("z_loss", z_loss)
    _number("label_smoothing", label_smoothing)
    if label_smoothing >= 1:
        raise UserError(f"train.label_smoothing must be in [0, 1), got {label_smoothing}")
    _number("loss_normalizing_factor", loss_normalizing_factor, strict=True, optional=True)
    _integer("checkpoint_period (CHECKPOINT_PERIOD)", checkpoint_period)
    _integer("keep_checkpoints", keep_checkpoints)
    _integer("keep_period", keep_period, optional=True)
    _integer("log_period", log_period)
    _integer("eval_period (EVAL_PERIOD)", eval_period, optional=True)
    _integer("eval_batches", eval_batches)
    _number("peer_timeout_s", peer_timeout_s, strict=True, optional=True)
    if progress not in (None, "tqdm", "lines", "off"):
        raise UserError(f"unknown train.progress {progress!r}; choose tqdm, lines, off or None")


def check_model_dir(model_dir: str) -> None:
    """model_dir is a directory, or can be created as one, and is writable: found before any work."""
    path = os.path.abspath(model_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--model_dir {path} is a file, not a directory; choose another --model_dir")
    existing = path
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--model_dir {path} cannot be created: {existing} is a file; choose another --model_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--model_dir {path} is not writable ({existing} is read-only for this user); fix its "
                        "permissions or choose another --model_dir")


def resolve_config(model: Union[str, T5Config], overrides: Optional[dict] = None) -> T5Config:
    """train()'s `model` (a preset name or a T5Config) with `model_overrides` applied."""
    if isinstance(model, str):
        return get_config(model, **(overrides or {}))
    if not isinstance(model, T5Config):
        raise UserError(f"train.model must be a preset name or a T5Config, got {type(model).__name__}")
    return model.replace(**(overrides or {}))


def check_model_and_features(config: T5Config, vocab: Vocabulary, feature_lengths, decoder_only: bool) -> None:
    """The vocabulary fits the embedding, and a decoder-only model's prefix-LM setting agrees with
    the features (rows with an inputs prefix need bidirectional prefix attention, and back)."""
    if config.vocab_size < vocab.vocab_size:
        raise UserError(f"the model's vocab_size {config.vocab_size} is smaller than the vocabulary's "
                        f"{vocab.vocab_size}; set T5Config.vocab_size >= {vocab.vocab_size}")
    if not isinstance(feature_lengths, dict):
        raise UserError(f"TASK_FEATURE_LENGTHS must be a dict like {{'inputs': 512, 'targets': 114}}, "
                        f"got {feature_lengths!r}")
    has_inputs = "inputs" in feature_lengths
    if not decoder_only and config.decoder_only_prefix_lm:
        raise UserError("T5Config.decoder_only_prefix_lm=True applies to decoder-only models; set "
                        "train.decoder_only=True, or drop decoder_only_prefix_lm")
    if decoder_only and has_inputs and not config.decoder_only_prefix_lm:
        raise UserError("TASK_FEATURE_LENGTHS has an 'inputs' length, so each decoder-only row starts with an inputs "
                        "prefix, but T5Config.decoder_only_prefix_lm is False (a plain causal LM over the prefix); "
                        "set T5Config.decoder_only_prefix_lm = True, or drop 'inputs' for a causal LM")
    if decoder_only and not has_inputs and config.decoder_only_prefix_lm:
        raise UserError("T5Config.decoder_only_prefix_lm = True needs an 'inputs' length in TASK_FEATURE_LENGTHS "
                        "(the prefix); add one, or set decoder_only_prefix_lm = False for a causal LM")


def check_init_checkpoint(path: str, config: T5Config, decoder_only: bool, vocab: Vocabulary) -> None:
    """The initial checkpoint exists, holds this model's shapes and (if it stored one) this vocabulary."""
    stored, stored_decoder_only, meta = stored_model(path)
    unscanned = lambda c: c.replace(scan_layers=False)  # noqa: E731 - layouts are restacked on load
    check_fits(f"initial checkpoint {path}", flat_shapes(abstract_params(unscanned(stored), stored_decoder_only)),
               flat_shapes(abstract_params(unscanned(config), decoder_only)), stored.to_dict(), config,
               "fine-tune with the model config the checkpoint was trained with (e.g. include its model gin file)")
    stored_vocab = (meta or {}).get("vocab")
    if stored_vocab and base64.b64decode(stored_vocab) != vocab.serialized_model:
        raise UserError(f"initial checkpoint {path} was trained with another vocabulary than the configured one; "
                        "set train.vocab_path to the checkpoint's vocabulary (its token ids would mean other pieces)")


def checkpoint_vocabulary(meta: dict) -> Optional[Vocabulary]:
    """The vocabulary stored in a training checkpoint's meta (None if it has none)."""
    return Vocabulary.from_bytes(base64.b64decode(meta["vocab"])) if meta.get("vocab") else None


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

def evaluate_loss(eval_step, params, batches, mesh, rules, batch_size: Optional[int] = None) -> Dict[str, float]:
    """Teacher-forced loss, perplexity and token accuracy over `batches` (summed, then divided); plus
    aux_loss when the model reports auxiliary losses (e.g. MoE load balancing).

    Stops at the first batch without a weighted token in the whole global batch (the end of a
    finite split whose shards pad after their end): every process sees the same global sums."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "weight_sum": 0.0}
    for batch in batches:
        sums = jax.device_get(eval_step(params, partitioning.global_batch_from_local(batch, mesh, rules, batch_size)))
        if float(sums["weight_sum"]) == 0:
            break
        for k in sums:
            totals[k] = totals.get(k, 0.0) + float(sums[k])
    weight = max(totals["weight_sum"], 1e-9)
    loss = totals["loss_sum"] / weight
    aux = {"aux_loss": totals["aux_loss_sum"] / weight} if "aux_loss_sum" in totals else {}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": totals["correct"] / weight,
            "tokens": totals["weight_sum"], **aux}


def _take(iterator, n: int):
    for _ in range(n):
        try:
            yield next(iterator)
        except StopIteration:
            return


@dataclasses.dataclass
class Steps:
    """The jitted steps of a run and what they were built from (train() and `t5lite compile` share them)."""

    config: T5Config
    optimizer: Any
    module: Any
    mesh: Any
    rules: Any
    shardings: TrainState  # of NamedShardings
    train_step: Callable
    eval_step: Callable
    teacher: Optional[Teacher] = None  # of a distillation run
    card: Optional[CardSteps] = None  # of an adapter-card run: its steps take the base as an input


def build_steps(config: T5Config, *, batch_size: int, devices: Optional[Sequence] = None,
                mesh_shape: Sequence[int] = (-1, 1, 1), partition_rules: Optional[str] = None,
                optimizer: str = "adafactor", schedule: str = "rsqrt", learning_rate: float = 1.0,
                warmup_steps: int = 10_000, train_steps: Optional[int] = None, clip_grad_norm: Optional[float] = None,
                optimizer_kwargs: Optional[dict] = None, decoder_only: bool = False, seed: int = 0,
                num_microbatches: int = 1, z_loss: float = 1e-4, label_smoothing: float = 0.0,
                loss_normalizing_factor: Optional[float] = None, loss: str = "cross_entropy",
                loss_kwargs: Optional[dict] = None, teacher_checkpoint: Optional[str] = None,
                teacher_arrays: bool = True, adapter=None, **unused_train_args) -> Steps:
    """Mesh (over `devices`, default all), rules, optimizer, shardings and jitted steps from train()'s arguments.

    A `teacher_checkpoint` is read into the mesh (its params become an input of the train step), or
    only described (shapes and shardings: enough to trace and compile) when `teacher_arrays` is False.
    An `adapter` (LoraConfig) also builds the card's steps (`Steps.card`), which take the base as an input.
    """
    del unused_train_args  # the rest of train()'s arguments (data, checkpoints, logging)
    if adapter is not None and (loss != "cross_entropy" or teacher_checkpoint):
        raise UserError(f"an adapter card trains with the cross_entropy loss only, not {loss!r} with a teacher; "
                        "drop train.adapter, or train.loss / train.teacher_checkpoint")
    mesh = partitioning.make_mesh(*mesh_shape, devices=devices)
    if partition_rules is not None and partition_rules not in partitioning.RULE_SETS:
        raise UserError(f"unknown train.partition_rules {partition_rules!r}; choose from "
                        f"{', '.join(partitioning.RULE_SETS)} (or None for the mesh's default)")
    rules = partitioning.RULE_SETS[partition_rules] if partition_rules else partitioning.rules_for(mesh)
    batch_splits = int(np.prod([mesh.shape[a] for a in partitioning.BATCH_MESH_AXES]))
    if batch_size % batch_splits:
        raise UserError(f"BATCH_SIZE {batch_size} is not divisible by the {batch_splits} data x fsdp shards of the "
                        f"mesh; use a multiple of {batch_splits}")
    opt = make_optimizer(optimizer, schedule, learning_rate, warmup_steps, total_steps=train_steps,
                         clip_grad_norm=clip_grad_norm, **(optimizer_kwargs or {}))
    module = DecoderOnly(config) if decoder_only else EncoderDecoder(config)
    shardings = partitioning.state_shardings(config, opt, mesh, rules, decoder_only)
    teacher = None
    if teacher_checkpoint:
        teacher = (load_teacher if teacher_arrays else abstract_teacher)(
            teacher_checkpoint, teacher_config(teacher_checkpoint, config, decoder_only), decoder_only, mesh, rules)
    train_step = make_train_step(module, opt, mesh, rules, shardings, teacher=teacher, loss=loss,
                                 loss_kwargs=loss_kwargs, dropout_seed=seed, num_microbatches=num_microbatches,
                                 z_loss=z_loss, label_smoothing=label_smoothing,
                                 loss_normalizing_factor=loss_normalizing_factor)
    eval_step = make_eval_step(module, mesh, rules, shardings.params)
    card = None
    if adapter is not None:
        card = build_card_steps(adapter, config=config, decoder_only=decoder_only, module=module, optimizer=opt,
                                mesh=mesh, rules=rules, base_shardings=shardings.params, seed=seed,
                                num_microbatches=num_microbatches, z_loss=z_loss, label_smoothing=label_smoothing,
                                loss_normalizing_factor=loss_normalizing_factor)
    return Steps(config, opt, module, mesh, rules, shardings, train_step, eval_step, teacher, card)


@dataclasses.dataclass
class Run:
    """Everything the loop needs, checked. `data` is rewound to the start (a restore moves it)."""

    model_dir: str
    task: str
    config: T5Config
    vocab: Vocabulary
    decoder_only: bool
    mesh: Any
    rules: Any
    abstract_state: TrainState
    initial_state: Callable[[], TrainState]
    train_step: Callable
    data: Any
    batch_size: int
    evaluate: Callable[[Any], Dict[str, float]]
    monitor: Callable[[int], Monitor]
    train_steps: int
    log_period: int
    eval_period: Optional[int]
    checkpoint_period: int
    keep_checkpoints: int
    keep_period: Optional[int]
    peer_timeout_s: Optional[float]
    card: Optional[CardTraining] = None  # an adapter-card run: only the card trains (t5lite/train/cards.py)
    data_settings: Optional[dict] = None  # what the data position depends on (recorded in every checkpoint)
    num_microbatches: int = 1

    def next_batch(self) -> dict:
        """The next global batch, sharded over the mesh (this process supplies its rows)."""
        return partitioning.global_batch_from_local(next(self.data), self.mesh, self.rules, self.batch_size)

    def batch_unit(self) -> int:
        """Global batch sizes this run's mesh and microbatches can split are multiples of this."""
        splits = int(np.prod([self.mesh.shape[a] for a in partitioning.BATCH_MESH_AXES]))
        return math.lcm(splits, int(self.num_microbatches))

    def checkpoint_meta(self, operative_gin: str) -> dict:
        meta = checkpoint_meta(self.config, operative_gin, self.vocab.serialized_model, self.decoder_only)
        meta["data"] = self.data_settings
        return {**meta, "card": self.card.meta()} if self.card is not None else meta

    def saved(self, step: int, state: TrainState, operative_gin: str) -> None:
        """After each checkpoint: a card run also rewrites model_dir/card, the card alone."""
        if self.card is not None:
            self.card.write(self.model_dir, step, state.params, self.config, self.decoder_only, self.task,
                            operative_gin)


def sources_fingerprint(task_obj, split: str = "train") -> str:
    """A short hash of the sources a task or mixture reads: per task its name, rate, record count and
    first and last records. Cheap (two records), and enough to tell another corpus or another version
    of one apart; identical on every process."""
    parts = task_obj.weighted_tasks() if hasattr(task_obj, "weighted_tasks") else [(task_obj, 1.0)]
    described = []
    for task, rate in parts:
        source = task.source(split)
        n = len(source)
        ends = [source[0], source[n - 1]] if n else []
        described.append([task.name, round(float(rate), 12), n, ends])
    text = json.dumps(described, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def data_settings(task_obj, *, seed: int, feature_lengths, batch_size: int, data_shards: int, pack: bool,
                  decoder_only: bool) -> dict:
    """What the saved data position depends on: a resume that changes any of them cannot continue the
    data where it stopped (t5lite/train/checkpoint.py compares them)."""
    return {"task": task_obj.name, "sources": sources_fingerprint(task_obj), "seed": int(seed),
            "feature_lengths": {k: int(v) for k, v in sorted(feature_lengths.items())},
            "batch_size": int(batch_size), "data_shards": int(data_shards), "pack": bool(pack),
            "decoder_only": bool(decoder_only)}


def _first_batch(iterator, what: str) -> None:
    """Reads one batch of a throwaway iterator, so malformed data and bad preprocessing fail now."""
    try:
        next(iterator)
    except StopIteration:
        raise UserError(f"{what} yields no batch: it has too few examples for one batch; add data or lower "
                        "BATCH_SIZE") from None


def prepare(*, model_dir: str, task: str, train_steps: int, batch_size: int, feature_lengths: Dict[str, int],
            model, model_overrides, vocab_path, decoder_only: bool, pack: bool, seed: int, optimizer: str,
            schedule: str, learning_rate: float, warmup_steps: int, clip_grad_norm, optimizer_kwargs,
            num_microbatches: int, z_loss: float, label_smoothing: float, loss_normalizing_factor,
            mesh_shape: Sequence[int], partition_rules, data_shards, checkpoint_period: int, keep_checkpoints: int,
            keep_period,
            log_period: int, eval_period, eval_batches: int, eval_split: str, init_checkpoint, peak_flops,
            progress, peer_timeout_s, loss: str = "cross_entropy", loss_kwargs: Optional[dict] = None,
            teacher_checkpoint: Optional[str] = None, adapter=None) -> Run:
    """Checks every setting and builds the run; raises UserError on the first mistake, writes nothing."""
    if not model_dir:
        raise UserError("set --model_dir (or MODEL_DIR in a gin file)")
    check_model_dir(model_dir)
    check_settings(train_steps=train_steps, batch_size=batch_size, seed=seed, learning_rate=learning_rate,
                   warmup_steps=warmup_steps, num_microbatches=num_microbatches, z_loss=z_loss,
                   label_smoothing=label_smoothing, loss_normalizing_factor=loss_normalizing_factor,
                   checkpoint_period=checkpoint_period, keep_checkpoints=keep_checkpoints, keep_period=keep_period,
                   log_period=log_period, eval_period=eval_period, eval_batches=eval_batches,
                   peer_timeout_s=peer_timeout_s, progress=progress)
    loss_fn = losses.make(loss, loss_kwargs, z_loss=z_loss, label_smoothing=label_smoothing)
    check_loss_and_teacher(loss_fn, loss, teacher_checkpoint)
    task_obj = tasks_lib.get(task)
    vocab = Vocabulary(vocab_path) if vocab_path else tasks_lib.default_vocabulary()
    config = resolve_config(model, model_overrides)
    check_model_and_features(config, vocab, feature_lengths, decoder_only)
    if init_checkpoint:
        check_init_checkpoint(init_checkpoint, config, decoder_only, vocab)
    elif adapter is not None:
        raise UserError("training an adapter card needs the base model it adapts: give --init_checkpoint DIR "
                        "(or INITIAL_CHECKPOINT_PATH)")
    teacher_cfg = teacher_config(teacher_checkpoint, config, decoder_only, vocab) if teacher_checkpoint else None

    steps = build_steps(config, batch_size=batch_size, mesh_shape=mesh_shape, partition_rules=partition_rules,
                        optimizer=optimizer, schedule=schedule, learning_rate=learning_rate, warmup_steps=warmup_steps,
                        train_steps=train_steps, clip_grad_norm=clip_grad_norm, optimizer_kwargs=optimizer_kwargs,
                        decoder_only=decoder_only, seed=seed, num_microbatches=num_microbatches, z_loss=z_loss,
                        label_smoothing=label_smoothing, loss_normalizing_factor=loss_normalizing_factor, loss=loss,
                        loss_kwargs=loss_kwargs, teacher_checkpoint=teacher_checkpoint, adapter=adapter)
    mesh, rules, opt, shardings = steps.mesh, steps.rules, steps.optimizer, steps.shardings
    num_shards = default_num_shards(batch_size) if data_shards is None else data_shards
    _integer("data_shards", num_shards)
    if batch_size % num_shards:
        raise UserError(f"train.data_shards {num_shards} does not divide BATCH_SIZE {batch_size}; choose a divisor")
    shards = partitioning.data_shards_of_rows(partitioning.process_batch_rows(mesh, rules, batch_size), batch_size,
                                              num_shards)

    def batches(split, shuffle, num_epochs, **options):
        return task_obj.pipeline(split, vocab, feature_lengths=feature_lengths, batch_size=batch_size, seed=seed,
                                 shuffle=shuffle, num_epochs=num_epochs, pack=pack, decoder_only=decoder_only,
                                 num_shards=num_shards, shards=shards, pad_after_end=num_epochs is not None,
                                 **options)

    # A check batch from its own iterator, packing one row per shard at a time: the training iterator's
    # first batch packs a whole window ahead (32 batches' worth), work a throwaway read would waste.
    _first_batch(batches("train", True, None, pack_window=1), f"the train split of task {task_obj.name!r}")
    eval_fn = None
    if eval_period:
        if eval_split not in task_obj.splits:
            raise UserError(f"task {task_obj.name!r} has no split {eval_split!r} to evaluate on (EVAL_PERIOD is set); "
                            f"set train.eval_split to one of {', '.join(task_obj.splits)}, or EVAL_PERIOD = None")
        if len(task_obj.source(eval_split)) == 0:
            raise UserError(f"the {eval_split} split of task {task_obj.name!r} is empty; add data or set "
                            "EVAL_PERIOD = None")
        _first_batch(batches(eval_split, False, 1), f"the {eval_split} split of task {task_obj.name!r}")
        eval_fn = lambda params: evaluate_loss(eval_step, params, _take(batches(eval_split, False, 1), eval_batches),  # noqa: E731
                                               mesh, rules, batch_size)

    data = batches("train", True, None, prefetch=2)
    card = None
    if adapter is not None:  # train a LoRA card on the frozen init_checkpoint
        card = prepare_card_training(steps.card, config=config, base_shardings=shardings.params,
                                     init_checkpoint=init_checkpoint, model_dir=model_dir, seed=seed)
        log.info("adapter card: %d trainable parameters, %.3f%% of the base's %d", card.num_params,
                 100.0 * card.num_params / card.base_params, card.base_params)
    eval_step = card.eval_step if card else steps.eval_step

    def initial_state() -> TrainState:
        if card is not None:
            return card.initial_state()
        state = partitioning.init_train_state(config, opt, mesh, rules, jax.random.key(seed), decoder_only)
        if init_checkpoint:
            _, params = load_any_params(init_checkpoint, config)
            params = jax.device_put(params, shardings.params)
            state = jax.jit(lambda p: TrainState.create(p, opt), out_shardings=shardings)(params)
            log.info("initialised parameters from %s", init_checkpoint)
        return state

    lengths = (feature_lengths.get("inputs", 0), feature_lengths["targets"])
    flops = model_flops_per_step(config, batch_size, *lengths, decoder_only=decoder_only, frozen_base=card is not None)
    if teacher_cfg:  # the teacher's forward pass is work the step does too
        flops += model_flops_per_step(teacher_cfg, batch_size, *lengths, decoder_only=decoder_only, training=False)
    peak = peak_flops_per_device(override=peak_flops)

    def monitor(start_step: int) -> Monitor:
        return Monitor(model_dir, total_steps=train_steps, start_step=start_step, flops_per_step=flops,
                       tokens_per_step=batch_size * sum(lengths), num_devices=jax.device_count(), peak_flops=peak,
                       is_primary=jax.process_index() == 0, progress=progress)

    abstract_state = card.abstract_state if card else partitioning.abstract_train_state(config, opt, shardings,
                                                                                         decoder_only)
    return Run(model_dir=model_dir, task=task, config=config, vocab=vocab, decoder_only=decoder_only, mesh=mesh,
               rules=rules, abstract_state=abstract_state, initial_state=initial_state,
               train_step=card.train_step if card else steps.train_step, data=data, batch_size=batch_size,
               evaluate=eval_fn, monitor=monitor,
               train_steps=train_steps, log_period=log_period, eval_period=eval_period,
               checkpoint_period=checkpoint_period, keep_checkpoints=keep_checkpoints, keep_period=keep_period,
               peer_timeout_s=peer_timeout_s, card=card, num_microbatches=num_microbatches,
               data_settings=data_settings(task_obj, seed=seed, feature_lengths=feature_lengths, batch_size=batch_size,
                                           data_shards=num_shards, pack=pack, decoder_only=decoder_only))
