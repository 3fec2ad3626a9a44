"""A run: built ONCE from a TrainConfig, then consumed as it is by the loop, `t5lite compile`, bench and sweeps.

    train = TrainConfig(...)                 # settings, checked (t5lite/train/config.py)
    steps = build_steps(train, config, loss) # mesh + rules, optimizer, shardings, the jitted steps (no data)
    run = Run.build(train)                   # + task, vocabulary, data iterators, evaluator, monitor; all checked

`build_steps` is what a program needs to be traced and compiled (`t5lite compile` stops there);
`Run.build` adds what training reads, and checks everything a user can get wrong (the checks live
in t5lite/train/checks.py) before anything is written into model_dir.
"""

import dataclasses
import logging
import math
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import numpy as np

from t5lite.data import tasks as tasks_lib
from t5lite.data.pipeline import default_num_shards
from t5lite.data.vocab import Vocabulary
from t5lite.errors import UserError
from t5lite.model import DecoderOnly, EncoderDecoder, T5Config
from t5lite.train import checks, partitioning
from t5lite.train.cards import CardSteps, CardTraining, build_card_steps, prepare_card_training
from t5lite.train.checkpoint import checkpoint_meta, load_any_params
from t5lite.train.config import TrainConfig
from t5lite.train.monitor import Monitor, model_flops_per_step, peak_flops_per_device
from t5lite.train.state import TrainState
from t5lite.train.step import make_eval_step, make_train_step
from t5lite.train.teacher import Teacher, abstract_teacher, check_loss_and_teacher, load_teacher, teacher_config

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The steps: everything a program needs to be traced (no data, no model_dir).
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Steps:
    """The jitted steps of a run and what they were built from (training and `t5lite compile` share them)."""

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


def build_steps(train: TrainConfig, config: T5Config, loss, *, devices: Optional[Sequence] = None,
                teacher_arrays: bool = True) -> Steps:
    """Mesh (over `devices`, default all), rules, optimizer, shardings and the jitted steps of `train`.

    `loss` is the run's loss object (train.make_loss()). A teacher checkpoint is read into the mesh (its
    params become an input of the train step), or only described (shapes and shardings: enough to trace
    and compile) when `teacher_arrays` is False. An adapter also builds the card's steps (`Steps.card`),
    which take the base as an input.
    """
    if train.adapter is not None and (train.loss != "cross_entropy" or train.teacher_checkpoint):
        raise UserError(f"an adapter card trains with the cross_entropy loss only, not {train.loss!r} with a teacher; "
                        "drop train.adapter, or train.loss / train.teacher_checkpoint")
    mesh = partitioning.make_mesh(*train.mesh_shape, devices=devices)
    if train.partition_rules is not None and train.partition_rules not in partitioning.RULE_SETS:
        raise UserError(f"unknown train.partition_rules {train.partition_rules!r}; choose from "
                        f"{', '.join(partitioning.RULE_SETS)} (or None for the mesh's default)")
    rules = partitioning.RULE_SETS[train.partition_rules] if train.partition_rules else partitioning.rules_for(mesh)
    batch_splits = int(np.prod([mesh.shape[a] for a in partitioning.BATCH_MESH_AXES]))
    if train.batch_size % batch_splits:
        raise UserError(f"BATCH_SIZE {train.batch_size} is not divisible by the {batch_splits} data x fsdp shards of "
                        f"the mesh; use a multiple of {batch_splits}")
    opt = train.make_optimizer()
    module = DecoderOnly(config) if train.decoder_only else EncoderDecoder(config)
    shardings = partitioning.state_shardings(config, opt, mesh, rules, train.decoder_only)
    teacher = None
    if train.teacher_checkpoint:
        teacher = (load_teacher if teacher_arrays else abstract_teacher)(
            train.teacher_checkpoint, teacher_config(train.teacher_checkpoint, config, train.decoder_only),
            train.decoder_only, mesh, rules)
    step_settings = dict(loss=loss, dropout_seed=train.seed, num_microbatches=train.num_microbatches,
                         loss_normalizing_factor=train.loss_normalizing_factor)
    train_step = make_train_step(module, opt, mesh, rules, shardings, teacher=teacher, **step_settings)
    eval_step = make_eval_step(module, mesh, rules, shardings.params)
    card = None
    if train.adapter is not None:
        card = build_card_steps(train.adapter, config=config, decoder_only=train.decoder_only, module=module,
                                optimizer=opt, mesh=mesh, rules=rules, base_shardings=shardings.params, **step_settings)
    return Steps(config, opt, module, mesh, rules, shardings, train_step, eval_step, teacher, card)


# ---------------------------------------------------------------------------------------------
# The run: the steps plus the data, the evaluator and the monitor, every setting checked.
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
class Run:
    """Everything the loop needs, checked. `data` starts at the beginning (a restore moves it)."""

    train: TrainConfig
    config: T5Config
    vocab: Vocabulary
    mesh: Any
    rules: Any
    abstract_state: TrainState
    initial_state: Callable[[], TrainState]
    train_step: Callable
    data: Any
    evaluate: Optional[Callable[[Any], Dict[str, float]]]
    monitor: Callable[[int], Monitor]
    data_settings: dict  # what the data position depends on (recorded in every checkpoint)
    card: Optional[CardTraining] = None  # an adapter-card run: only the card trains (t5lite/train/cards.py)

    def next_batch(self) -> dict:
        """The next global batch, sharded over the mesh (this process supplies its rows)."""
        return partitioning.global_batch_from_local(next(self.data), self.mesh, self.rules, self.train.batch_size)

    def batch_unit(self) -> int:
        """Global batch sizes this run's mesh and microbatches can split are multiples of this."""
        splits = int(np.prod([self.mesh.shape[a] for a in partitioning.BATCH_MESH_AXES]))
        return math.lcm(splits, int(self.train.num_microbatches))

    def checkpoint_meta(self, operative_gin: str) -> dict:
        meta = checkpoint_meta(self.config, operative_gin, self.vocab.serialized_model, self.train.decoder_only)
        meta["data"] = self.data_settings
        return {**meta, "card": self.card.meta()} if self.card is not None else meta

    def saved(self, step: int, state: TrainState, operative_gin: str) -> None:
        """After each checkpoint: a card run also rewrites model_dir/card, the card alone."""
        if self.card is not None:
            self.card.write(self.train.model_dir, step, state.params, self.config, self.train.decoder_only,
                            self.train.task, operative_gin)

    @classmethod
    def build(cls, train: TrainConfig) -> "Run":
        """Checks every setting and builds the run; raises UserError on the first mistake, writes nothing."""
        checks.check_model_dir(train.model_dir)
        loss = train.make_loss()
        check_loss_and_teacher(loss, train.loss, train.teacher_checkpoint)
        task = tasks_lib.get(train.task)
        vocab = Vocabulary(train.vocab_path) if train.vocab_path else tasks_lib.default_vocabulary()
        config = checks.resumed_attention_layout(train.model_dir, train.model_config())
        checks.check_model_and_features(config, vocab, train.feature_lengths, train.decoder_only)
        if train.init_checkpoint:
            checks.check_init_checkpoint(train.init_checkpoint, config, train.decoder_only, vocab)
        elif train.adapter is not None:
            raise UserError("training an adapter card needs the base model it adapts: give --init_checkpoint DIR "
                            "(or INITIAL_CHECKPOINT_PATH)")
        teacher_cfg = (teacher_config(train.teacher_checkpoint, config, train.decoder_only, vocab)
                       if train.teacher_checkpoint else None)
        steps = build_steps(train, config, loss)
        data, evaluate, num_shards = _data(train, task, vocab, steps)

        card = None
        if train.adapter is not None:  # train a LoRA card on the frozen init_checkpoint
            card = prepare_card_training(steps.card, config=config, base_shardings=steps.shardings.params,
                                         init_checkpoint=train.init_checkpoint, model_dir=train.model_dir,
                                         seed=train.seed)
            log.info("adapter card: %d trainable parameters, %.3f%% of the base's %d", card.num_params,
                     100.0 * card.num_params / card.base_params, card.base_params)
        eval_step = card.eval_step if card else steps.eval_step
        evaluate_fn = (lambda params: evaluate(eval_step, params)) if evaluate else None
        abstract_state = card.abstract_state if card else partitioning.abstract_train_state(
            config, steps.optimizer, steps.shardings, train.decoder_only)
        settings = checks.data_settings(task, seed=train.seed, feature_lengths=train.feature_lengths,
                                        batch_size=train.batch_size, data_shards=num_shards, pack=train.pack,
                                        decoder_only=train.decoder_only)
        return cls(train=train, config=config, vocab=vocab, mesh=steps.mesh, rules=steps.rules,
                   abstract_state=abstract_state, initial_state=_initial_state(train, steps, card),
                   train_step=card.train_step if card else steps.train_step, data=data, evaluate=evaluate_fn,
                   monitor=_monitor(train, config, teacher_cfg, frozen_base=card is not None),
                   data_settings=settings, card=card)


def _data(train: TrainConfig, task, vocab: Vocabulary, steps: Steps):
    """(the training iterator, evaluate(eval_step, params) or None, the number of virtual data shards); the
    train split's and the eval split's first batches read and checked on throwaway iterators."""
    num_shards = default_num_shards(train.batch_size) if train.data_shards is None else train.data_shards
    if train.batch_size % num_shards:
        raise UserError(f"train.data_shards {num_shards} does not divide BATCH_SIZE {train.batch_size}; choose a "
                        "divisor")
    mesh, rules = steps.mesh, steps.rules
    shards = partitioning.data_shards_of_rows(partitioning.process_batch_rows(mesh, rules, train.batch_size),
                                              train.batch_size, num_shards)

    def batches(split, shuffle, num_epochs, **options):
        return task.pipeline(split, vocab, feature_lengths=train.feature_lengths, batch_size=train.batch_size,
                             seed=train.seed, shuffle=shuffle, num_epochs=num_epochs, pack=train.pack,
                             decoder_only=train.decoder_only, num_shards=num_shards, shards=shards,
                             pad_after_end=num_epochs is not None, **options)

    # A check batch from its own iterator, packing one row per shard at a time: the training iterator's
    # first batch packs a whole window ahead (32 batches' worth), work a throwaway read would waste.
    checks.first_batch(batches("train", True, None, pack_window=1), f"the train split of task {task.name!r}")
    evaluate = None
    if train.eval_period:
        split = train.eval_split
        if split not in task.splits:
            raise UserError(f"task {task.name!r} has no split {split!r} to evaluate on (EVAL_PERIOD is set); "
                            f"set train.eval_split to one of {', '.join(task.splits)}, or EVAL_PERIOD = None")
        members = task.tasks if isinstance(task, tasks_lib.Mixture) else [task]  # a mixture evaluates on its tasks' splits
        if sum(len(t.source(split)) for t in members) == 0:
            raise UserError(f"the {split} split of task {task.name!r} is empty; add data or set EVAL_PERIOD = None")
        checks.first_batch(batches(split, False, 1), f"the {split} split of task {task.name!r}")

        def evaluate(eval_step, params):
            return evaluate_loss(eval_step, params, _take(batches(split, False, 1), train.eval_batches), mesh, rules,
                                 train.batch_size)

    return batches("train", True, None, prefetch=2), evaluate, num_shards


def _initial_state(train: TrainConfig, steps: Steps, card: Optional[CardTraining]) -> Callable[[], TrainState]:
    """A fresh state: the card's, or the model's from the seed, or the model's from init_checkpoint."""
    def initial_state() -> TrainState:
        if card is not None:
            return card.initial_state()
        state = partitioning.init_train_state(steps.config, steps.optimizer, steps.mesh, steps.rules,
                                              jax.random.key(train.seed), train.decoder_only)
        if train.init_checkpoint:
            _, params = load_any_params(train.init_checkpoint, steps.config)
            params = jax.device_put(params, steps.shardings.params)
            state = jax.jit(lambda p: TrainState.create(p, steps.optimizer), out_shardings=steps.shardings)(params)
            log.info("initialised parameters from %s", train.init_checkpoint)
        return state

    return initial_state


def _monitor(train: TrainConfig, config: T5Config, teacher_cfg: Optional[T5Config],
             frozen_base: bool) -> Callable[[int], Monitor]:
    """monitor(start_step): the run's telemetry, with the model FLOPs per step its MFU is measured against."""
    flops = model_flops_per_step(config, train.batch_size, *train.lengths, decoder_only=train.decoder_only,
                                 frozen_base=frozen_base)
    if teacher_cfg:  # the teacher's forward pass is work the step does too
        flops += model_flops_per_step(teacher_cfg, train.batch_size, *train.lengths, decoder_only=train.decoder_only,
                                      training=False)
    peak = peak_flops_per_device(override=train.peak_flops)

    def monitor(start_step: int) -> Monitor:
        return Monitor(train.model_dir, total_steps=train.train_steps, start_step=start_step, flops_per_step=flops,
                       tokens_per_step=train.batch_size * sum(train.lengths), num_devices=jax.device_count(),
                       peak_flops=peak, is_primary=jax.process_index() == 0, progress=train.progress)

    return monitor
