"""TrainConfig: everything a training run sets, in one frozen object checked once.

gin binds its fields as `train.<field>` (experiments/base.gin feeds the T5X macros into them:
MODEL_DIR, MIXTURE_OR_TASK_NAME, TRAIN_STEPS, BATCH_SIZE, TASK_FEATURE_LENGTHS, ...). Every entry
point that trains or compiles a run (`t5lite train` / `finetune` / `distill train`, card training,
`t5lite compile`, `t5lite bench`, each sweep point) builds one, and t5lite/train/run.py builds the
run from it. Types and ranges are checked when it is made (TRAIN_STEPS=2.5 or -5 must not train),
each mistake one UserError naming the binding to fix; what needs data, files or devices is checked
by Run.build.
"""

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from t5lite.errors import UserError
from t5lite.model import T5Config, get_config
from t5lite.train import losses
from t5lite.train.optimizers import Optimizer, make_optimizer

PROGRESS = (None, "tqdm", "lines", "off")


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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run's settings. The first five have no default (base.gin binds them from the macros)."""

    # --- what to train, on what
    model_dir: str
    task: Any  # a task or mixture name (or a Task / Mixture object)
    train_steps: int
    batch_size: int
    feature_lengths: Dict[str, int]
    model: Union[str, T5Config] = "tiny"  # a preset name or a T5Config (gin: T5Config.* bindings)
    model_overrides: Optional[dict] = None
    vocab_path: Optional[str] = None
    decoder_only: bool = False
    pack: bool = True
    seed: int = 0
    # --- optimizer and schedule
    optimizer: str = "adafactor"
    schedule: str = "rsqrt"
    learning_rate: float = 1.0
    warmup_steps: int = 10_000
    clip_grad_norm: Optional[float] = None
    optimizer_kwargs: Optional[dict] = None
    num_microbatches: int = 1
    # --- loss (a registered loss built once from these: TrainConfig.make_loss)
    loss: str = "cross_entropy"
    loss_kwargs: Optional[dict] = None
    teacher_checkpoint: Optional[str] = None
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    loss_normalizing_factor: Optional[float] = None
    # --- mesh and data sharding
    mesh_shape: Tuple[int, ...] = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    partition_rules: Optional[str] = None
    data_shards: Optional[int] = None  # virtual data shards (default gcd(batch_size, 64)); must divide the batch
    # --- checkpoints, evaluation, logging
    checkpoint_period: int = 1000
    keep_checkpoints: int = 2
    keep_period: Optional[int] = None
    async_checkpoints: bool = True
    log_period: int = 10
    eval_period: Optional[int] = None
    eval_batches: int = 10
    eval_split: str = "validation"
    init_checkpoint: Optional[str] = None  # params to start from (fine-tuning; the frozen base of a card)
    peak_flops: Optional[float] = None
    progress: Optional[str] = None
    peer_timeout_s: Optional[float] = 600.0  # a multi-process run ends with one line after this long without a step
    adapter: Any = None  # a LoraConfig: train only a LoRA card on the frozen init_checkpoint
    reset_data: bool = False  # resume although the data settings changed; the new data starts at its beginning

    def __post_init__(self):
        if not self.model_dir:
            raise UserError("set --model_dir (or MODEL_DIR in a gin file)")
        _integer("train_steps (TRAIN_STEPS)", self.train_steps)
        _integer("batch_size (BATCH_SIZE)", self.batch_size)
        if not isinstance(self.feature_lengths, dict):
            raise UserError(f"TASK_FEATURE_LENGTHS must be a dict like {{'inputs': 512, 'targets': 114}}, "
                            f"got {self.feature_lengths!r}")
        _integer("seed (RANDOM_SEED)", self.seed, minimum=0)
        if self.seed >= 2**32:
            raise UserError(f"train.seed (RANDOM_SEED) must be < 2**32, got {self.seed}")
        _number("learning_rate", self.learning_rate, strict=True)
        _integer("warmup_steps", self.warmup_steps, minimum=0)
        _integer("num_microbatches", self.num_microbatches)
        if self.batch_size % self.num_microbatches:
            raise UserError(f"train.num_microbatches={self.num_microbatches} does not divide BATCH_SIZE "
                            f"{self.batch_size}; choose a divisor of the batch size")
        _number("z_loss", self.z_loss)
        _number("label_smoothing", self.label_smoothing)
        if self.label_smoothing >= 1:
            raise UserError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _number("loss_normalizing_factor", self.loss_normalizing_factor, strict=True, optional=True)
        _integer("data_shards", self.data_shards, optional=True)
        _integer("checkpoint_period (CHECKPOINT_PERIOD)", self.checkpoint_period)
        _integer("keep_checkpoints", self.keep_checkpoints)
        _integer("keep_period", self.keep_period, optional=True)
        _integer("log_period", self.log_period)
        _integer("eval_period (EVAL_PERIOD)", self.eval_period, optional=True)
        _integer("eval_batches", self.eval_batches)
        _number("peer_timeout_s", self.peer_timeout_s, strict=True, optional=True)
        if self.progress not in PROGRESS:
            raise UserError(f"unknown train.progress {self.progress!r}; choose tqdm, lines, off or None")
        if not isinstance(self.reset_data, bool):
            raise UserError(f"train.reset_data must be True or False, got {self.reset_data!r}; fix its gin binding")
        object.__setattr__(self, "mesh_shape", tuple(self.mesh_shape))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def model_config(self) -> T5Config:
        """The model: `model` (a preset name or a T5Config) with `model_overrides` applied."""
        if isinstance(self.model, str):
            return get_config(self.model, **(self.model_overrides or {}))
        if not isinstance(self.model, T5Config):
            raise UserError(f"train.model must be a preset name or a T5Config, got {type(self.model).__name__}")
        config = self.model.replace(**(self.model_overrides or {}))
        return T5Config.from_dict(config.to_dict())  # gin's T5Config subclass -> the plain, hashable one

    def make_loss(self):
        """The registered loss `loss`, built once with `loss_kwargs` (and z_loss / label_smoothing where it takes them)."""
        return losses.make(self.loss, self.loss_kwargs, z_loss=self.z_loss, label_smoothing=self.label_smoothing)

    def make_optimizer(self) -> Optimizer:
        """The registered optimizer on the registered schedule, over `train_steps` steps."""
        return make_optimizer(self.optimizer, self.schedule, self.learning_rate, self.warmup_steps,
                              total_steps=self.train_steps, clip_grad_norm=self.clip_grad_norm,
                              **(self.optimizer_kwargs or {}))

    @property
    def lengths(self) -> Tuple[int, int]:
        """(inputs, targets) tokens per example (inputs 0 for a causal LM)."""
        return self.feature_lengths.get("inputs", 0), self.feature_lengths["targets"]


def fields() -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig))
