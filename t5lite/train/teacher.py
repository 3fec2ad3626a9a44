"""The teacher of a distillation run: any t5lite checkpoint, checked, then loaded sharded.

A teacher is a training model_dir or a params checkpoint (`t5lite convert from-hf` writes one),
of any size and T5Config, with the student's vocabulary size (the KL compares their
distributions token by token) and architecture kind (encoder-decoder or decoder-only, and the
same prefix-LM setting: it reads the student's batches). Its params are sharded by the
student's logical-axis rules and passed to the jitted train step as an input: never donated,
no gradient, no optimizer state. It computes in the student's dtype.
"""

import base64
import dataclasses
import logging
from typing import Any, Optional

import flax.linen as nn
import jax

from t5lite.data.vocab import Vocabulary
from t5lite.errors import UserError
from t5lite.model import DecoderOnly, EncoderDecoder, T5Config, abstract_params
from t5lite.train import partitioning
from t5lite.train.checkpoint import load_any_params, stored_model

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen model for the train step: its module (static), params and their shardings."""

    path: str
    config: T5Config
    module: nn.Module
    params: Any
    shardings: Any


def teacher_config(path: str, student: T5Config, decoder_only: bool, vocab: Optional[Vocabulary] = None) -> T5Config:
    """The config of the teacher checkpoint at `path` (in the student's dtype), after checking that it can
    teach `student` (and was trained with `vocab`, when given); one-line UserError otherwise. Reads no arrays."""
    if not path or not isinstance(path, str):
        raise UserError(f"train.teacher_checkpoint must be a checkpoint path, got {path!r}")
    config, teacher_decoder_only, meta = stored_model(path)  # a missing path is a UserError here
    fix = "distil from a teacher trained on the student's vocabulary and model kind"
    if config.vocab_size != student.vocab_size:
        raise UserError(f"teacher {path} has vocab_size {config.vocab_size} but the student has "
                        f"{student.vocab_size}; set T5Config.vocab_size = {config.vocab_size} or {fix}")
    if teacher_decoder_only != decoder_only:
        kinds = {True: "decoder-only", False: "encoder-decoder"}
        raise UserError(f"teacher {path} is {kinds[teacher_decoder_only]} but the student is {kinds[decoder_only]} "
                        f"(train.decoder_only = {decoder_only}); {fix}")
    if decoder_only and config.decoder_only_prefix_lm != student.decoder_only_prefix_lm:
        raise UserError(f"teacher {path} has decoder_only_prefix_lm = {config.decoder_only_prefix_lm} but the "
                        f"student {student.decoder_only_prefix_lm}; both must read the rows alike: {fix}")
    stored_vocab = (meta or {}).get("vocab")
    if vocab is not None and stored_vocab and base64.b64decode(stored_vocab) != vocab.serialized_model:
        raise UserError(f"teacher {path} was trained with another vocabulary than the configured one (same size, "
                        "other pieces); set train.vocab_path to the teacher's vocabulary")
    return config.replace(dtype=student.dtype)


def load_teacher(path: str, config: T5Config, decoder_only: bool, mesh, rules) -> Teacher:
    """Reads the teacher's params (as `config`, from teacher_config) and lays them out on `mesh` like the
    student's: each parameter's logical axes map to mesh axes through the same `rules`."""
    teacher = abstract_teacher(path, config, decoder_only, mesh, rules)
    _, params = load_any_params(path, config)
    log.info("teacher %s: %d+%d layers, d_model %d", path, config.num_encoder_layers, config.num_decoder_layers,
             config.emb_dim)
    return dataclasses.replace(teacher, params=jax.device_put(params, teacher.shardings))


def abstract_teacher(path: str, config: T5Config, decoder_only: bool, mesh, rules) -> Teacher:
    """The teacher without its arrays: params as ShapeDtypeStructs with their shardings (to trace, compile)."""
    boxed = abstract_params(config, decoder_only)
    shardings = partitioning.param_shardings(boxed, mesh, rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
    module = (DecoderOnly if decoder_only else EncoderDecoder)(config)
    return Teacher(path=path, config=config, module=module, params=params, shardings=shardings)


def check_loss_and_teacher(loss_fn, loss: str, teacher_checkpoint: Optional[str]) -> None:
    """A loss that learns from a teacher has one, and a teacher is never loaded for a loss that ignores it."""
    if loss_fn.needs_teacher and not teacher_checkpoint:
        raise UserError(f"train.loss {loss!r} learns from a teacher: set train.teacher_checkpoint (or "
                        "`t5lite distill train --teacher DIR`) to a training model_dir or a converted checkpoint")
    if teacher_checkpoint and not loss_fn.needs_teacher:
        raise UserError(f"train.teacher_checkpoint is set but train.loss {loss!r} uses no teacher; set "
                        "train.loss = 'distillation' or drop the teacher")
