"""The training loop: init or restore, train, evaluate, log, checkpoint, survive preemption.

`train(...)` is the one entry point (gin configures it; see t5lite/gin_utils.py). A run
killed at any moment resumes from the newest complete checkpoint in `model_dir` to exactly
the losses and parameters it would have had: the state, every process's data-iterator
position and the step-derived dropout keys are all restored.
"""

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Dict, Optional, Sequence, Union

import jax

from t5lite.data import tasks as tasks_lib
from t5lite.data.vocab import Vocabulary
from t5lite.errors import UserError
from t5lite.model import DecoderOnly, EncoderDecoder, T5Config, get_config
from t5lite.train import partitioning
from t5lite.train.checkpoint import TrainCheckpointer, checkpoint_meta, load_any_params
from t5lite.train.monitor import Monitor, model_flops_per_step, peak_flops_per_device
from t5lite.train.optimizers import make_optimizer
from t5lite.train.step import TrainState, make_eval_step, make_train_step


@dataclasses.dataclass
class _Preemption:
    """Set by SIGTERM (a preempted TPU VM / a scheduler's stop); the loop saves and exits cleanly."""

    requested: bool = False

    def install(self):
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting")
            self.requested = True

        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. under a test runner thread): no handler
            return lambda: None
        return lambda: signal.signal(signal.SIGTERM, previous)


def _resolve_config(model: Union[str, T5Config], vocab: Vocabulary, overrides: Optional[dict]) -> T5Config:
    config = get_config(model, **(overrides or {})) if isinstance(model, str) else model.replace(**(overrides or {}))
    if config.vocab_size < vocab.vocab_size:
        raise UserError(f"the model's vocab_size {config.vocab_size} is smaller than the vocabulary's "
                        f"{vocab.vocab_size}; set vocab_size >= {vocab.vocab_size} in the model config")
    return config


def _initial_state(config, optimizer, mesh, rules, shardings, seed, decoder_only, init_checkpoint):
    state = partitioning.init_train_state(config, optimizer, mesh, rules, jax.random.key(seed), decoder_only)
    if init_checkpoint:
        _, params = load_any_params(init_checkpoint, config)
        params = jax.device_put(params, shardings.params)
        state = jax.jit(lambda p: TrainState.create(p, optimizer), out_shardings=shardings)(params)
        logging.info("initialised parameters from %s", init_checkpoint)
    return state


def _host_metrics(metrics: Dict) -> Dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check_finite(metrics: Dict[str, float], step: int, last_saved: Optional[int]) -> None:
    if not math.isfinite(metrics["loss"]):
        kept = f"the last good checkpoint is step {last_saved}" if last_saved is not None else "no checkpoint was kept"
        raise UserError(f"loss is {metrics['loss']} at step {step}: training stopped ({kept}); lower the "
                        "learning rate, add warmup or gradient clipping, or check the data")


def evaluate_loss(eval_step, params, batches, mesh, rules) -> Dict[str, float]:
    """Teacher-forced loss, perplexity and token accuracy over `batches` (summed, then divided);
    plus aux_loss when the model reports auxiliary losses (e.g. MoE load balancing)."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "weight_sum": 0.0}
    for batch in batches:
        sums = _host_metrics(eval_step(params, partitioning.global_batch_from_local(batch, mesh, rules)))
        for k in sums:
            totals[k] = totals.get(k, 0.0) + sums[k]
    weight = max(totals["weight_sum"], 1e-9)
    loss = totals["loss_sum"] / weight
    aux = {"aux_loss": totals["aux_loss_sum"] / weight} if "aux_loss_sum" in totals else {}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": totals["correct"] / weight,
            "tokens": totals["weight_sum"], **aux}


def train(*, model_dir: str, task: str, train_steps: int, batch_size: int, feature_lengths: Dict[str, int],
          model: Union[str, T5Config] = "tiny", model_overrides: Optional[dict] = None,
          vocab_path: Optional[str] = None, decoder_only: bool = False, pack: bool = True, seed: int = 0,
          optimizer: str = "adafactor", schedule: str = "rsqrt", learning_rate: float = 1.0,
          warmup_steps: int = 10_000, clip_grad_norm: Optional[float] = None, optimizer_kwargs: Optional[dict] = None,
          num_microbatches: int = 1, z_loss: float = 1e-4, label_smoothing: float = 0.0,
          loss_normalizing_factor: Optional[float] = None, mesh_shape: Sequence[int] = (-1, 1, 1),
          partition_rules: Optional[str] = None, checkpoint_period: int = 1000, keep_checkpoints: int = 2,
          keep_period: Optional[int] = None, async_checkpoints: bool = True, log_period: int = 10,
          eval_period: Optional[int] = None, eval_batches: int = 10, eval_split: str = "validation",
          init_checkpoint: Optional[str] = None, peak_flops: Optional[float] = None, progress: Optional[str] = None,
          operative_gin: str = "") -> Dict[str, float]:
    """Trains `model` on `task` for `train_steps` global steps; returns the last logged metrics.

    Resumes automatically from `model_dir/checkpoints`. `init_checkpoint` (a params checkpoint
    from `t5lite convert from-hf` or another run's model_dir) seeds the parameters of a fresh
    run (fine-tuning). mesh_shape is (data, fsdp, tensor); -1 takes the remaining devices.
    """
    partitioning.maybe_initialize_distributed()
    task_obj = tasks_lib.get(task)
    vocab = Vocabulary(vocab_path) if vocab_path else tasks_lib.default_vocabulary()
    config = _resolve_config(model, vocab, model_overrides)
    mesh = partitioning.make_mesh(*mesh_shape)
    rules = partitioning.RULE_SETS[partition_rules] if partition_rules else partitioning.rules_for(mesh)
    opt = make_optimizer(optimizer, schedule, learning_rate, warmup_steps, total_steps=train_steps,
                         clip_grad_norm=clip_grad_norm, **(optimizer_kwargs or {}))
    module = DecoderOnly(config) if decoder_only else EncoderDecoder(config)
    shardings = partitioning.state_shardings(config, opt, mesh, rules, decoder_only)

    def batches(split, shuffle, num_epochs, data_seed):
        return task_obj.pipeline(split, vocab, feature_lengths=feature_lengths, batch_size=batch_size,
                                 seed=data_seed, shuffle=shuffle, num_epochs=num_epochs, pack=pack,
                                 decoder_only=decoder_only, process_index=jax.process_index(),
                                 process_count=jax.process_count())

    data = batches("train", True, None, seed)
    os.makedirs(model_dir, exist_ok=True)
    checkpointer = TrainCheckpointer(model_dir, max_to_keep=keep_checkpoints, keep_period=keep_period,
                                     async_save=async_checkpoints)
    restored = checkpointer.restore_latest(
        partitioning.abstract_train_state(config, opt, shardings, decoder_only), data)
    if restored is not None:
        start_step, state, _ = restored
        logging.info("resumed from %s at step %d", checkpointer.directory, start_step)
    else:
        start_step = 0
        state = _initial_state(config, opt, mesh, rules, shardings, seed, decoder_only, init_checkpoint)
    meta = checkpoint_meta(config, operative_gin, vocab.serialized_model)

    step_fn = make_train_step(module, opt, mesh, rules, shardings, dropout_seed=seed,
                              num_microbatches=num_microbatches, z_loss=z_loss, label_smoothing=label_smoothing,
                              loss_normalizing_factor=loss_normalizing_factor)
    eval_fn = make_eval_step(module, mesh, rules, shardings.params) if eval_period else None
    lengths = (feature_lengths.get("inputs", 0), feature_lengths["targets"])
    monitor = Monitor(model_dir, total_steps=train_steps, start_step=start_step,
                      flops_per_step=model_flops_per_step(config, batch_size, *lengths, decoder_only=decoder_only),
                      tokens_per_step=batch_size * sum(lengths), num_devices=jax.device_count(),
                      peak_flops=peak_flops_per_device(override=peak_flops), is_primary=jax.process_index() == 0,
                      progress=progress)

    preemption = _Preemption()
    uninstall = preemption.install()
    last_saved = start_step if restored is not None else None
    logged: Dict[str, float] = {}
    step, since, timer = start_step, 0, time.perf_counter()
    try:
        while step < train_steps and not preemption.requested:
            batch = partitioning.global_batch_from_local(next(data), mesh, rules)
            state, metrics = step_fn(state, batch)
            step, since = step + 1, since + 1
            if step == start_step + 1:  # keep compilation out of the throughput numbers
                jax.block_until_ready(metrics)
                logging.info("compiled and ran the first step in %.1f s", time.perf_counter() - timer)
                since, timer = 0, time.perf_counter()
            if step % log_period == 0 or step == train_steps:
                host = _host_metrics(metrics)
                logged = monitor.log(step, host, since, time.perf_counter() - timer)
                _check_finite(host, step, last_saved)
                since, timer = 0, time.perf_counter()
            if eval_fn is not None and (step % eval_period == 0 or step == train_steps):
                eval_data = batches(eval_split, False, 1, seed)
                monitor.log_eval(step, evaluate_loss(eval_fn, state.params, _take(eval_data, eval_batches),
                                                     mesh, rules))
                timer = time.perf_counter()
            if step % checkpoint_period == 0 or step == train_steps or preemption.requested:
                _check_finite(_host_metrics(metrics), step, last_saved)
                checkpointer.save(step, state, data, meta)
                last_saved = step
        if preemption.requested and last_saved != step:
            checkpointer.save(step, state, data, meta)
    finally:
        checkpointer.wait()
        checkpointer.close()
        monitor.close()
        uninstall()
    return logged


def _take(iterator, n: int):
    for _ in range(n):
        try:
            yield next(iterator)
        except StopIteration:
            return


def checkpoint_vocabulary(meta: dict) -> Optional[Vocabulary]:
    """The vocabulary stored in a training checkpoint's meta (None if it has none)."""
    import base64
    return Vocabulary.from_bytes(base64.b64decode(meta["vocab"])) if meta.get("vocab") else None


__all__ = ["train", "evaluate_loss", "checkpoint_vocabulary"]
