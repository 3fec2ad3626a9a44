"""Adapter cards on disk, loading them onto a base, and training only the card.

A *card* is a small directory: `card.json` (format 't5lite-card', the LoraConfig, the base's
fingerprint and checkpoint, the base's model config, the task, the step and the gin config it
was trained with) and `card.safetensors` (A and B of every adapted projection, unscanned, keyed
by module path). A card run (`train(adapter=LoraConfig(...))`) rewrites `model_dir/card/` at
every checkpoint; its checkpoints hold the card, the card's optimizer state and the fingerprint,
never the base. Loading a card onto a base whose fingerprint differs is a one-line UserError.
"""

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from t5lite.errors import UserError
from t5lite.model import T5Config, lora, unscan_params
from t5lite.train import partitioning
from t5lite.train import step as step_lib
from t5lite.train.checkpoint import load_any_params, read_meta, step_dirs
from t5lite.train.state import TrainState

CARD_FORMAT = "t5lite-card"
log = logging.getLogger(__name__)


@dataclasses.dataclass
class Card:
    """A card read from disk: its shape, unscanned params (NumPy) and what it was trained on."""

    spec: lora.LoraConfig
    params: dict
    base_fingerprint: str
    model: T5Config
    decoder_only: bool = False
    base_checkpoint: Optional[str] = None
    task: Optional[str] = None
    step: Optional[int] = None
    gin: str = ""
    path: Optional[str] = None

    @property
    def num_params(self) -> int:
        return lora.num_card_params(self.params)


def save_card(path: str, card: Card) -> None:
    """Writes (or atomically replaces) the card directory `path`."""
    path = os.path.abspath(path)
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = {"format": CARD_FORMAT, "lora": card.spec.to_dict(), "base_fingerprint": card.base_fingerprint,
            "base_checkpoint": card.base_checkpoint, "model": card.model.to_dict(), "decoder_only": card.decoder_only,
            "task": card.task, "step": card.step, "num_params": card.num_params, "gin": card.gin}
    try:
        with open(os.path.join(tmp, "card.json"), "w") as f:
            json.dump(meta, f, indent=1)
        flat = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in lora.flat_paths(card.params).items()}
        save_file(flat, os.path.join(tmp, "card.safetensors"), metadata={"format": CARD_FORMAT})
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def card_dir(path: str) -> str:
    """A card directory, or a card run's model_dir (its card/)."""
    for candidate in (path, os.path.join(path, "card")):
        if os.path.isfile(os.path.join(candidate, "card.json")):
            return candidate
    raise UserError(f"{path} is not an adapter card (no card.json in it or in its card/); train one with "
                    "`t5lite finetune` and train.adapter = @LoraConfig()")


def load_card(path: str) -> Card:
    directory = card_dir(path)
    try:
        with open(os.path.join(directory, "card.json")) as f:
            meta = json.load(f)
        params = lora.nest_paths(load_file(os.path.join(directory, "card.safetensors")))
    except Exception as e:  # noqa: BLE001 - a damaged json or safetensors file
        raise UserError(f"card {directory} is unreadable ({type(e).__name__}: {str(e)[:120]}); "
                        "train or copy it again") from None
    if not isinstance(meta, dict) or meta.get("format") != CARD_FORMAT:
        raise UserError(f"{directory}/card.json is not a t5lite card; train one with train.adapter = @LoraConfig()")
    return Card(spec=lora.LoraConfig.from_dict(meta["lora"]), params=params, base_fingerprint=meta["base_fingerprint"],
                model=T5Config.from_dict(meta["model"]), decoder_only=bool(meta.get("decoder_only")),
                base_checkpoint=meta.get("base_checkpoint"), task=meta.get("task"), step=meta.get("step"),
                gin=meta.get("gin") or "", path=directory)


def check_base(card: Card, base_fingerprint: str, base_path: str) -> None:
    """One line when `card` was trained on another base than the one at `base_path`."""
    if card.base_fingerprint != base_fingerprint:
        trained_on = f" ({card.base_checkpoint})" if card.base_checkpoint else ""
        raise UserError(f"card {card.path} was trained on another base model{trained_on}, not on {base_path} "
                        f"(base fingerprint {card.base_fingerprint}, this one {base_fingerprint}); use the card with "
                        "the base it was trained on")


def card_for(card: Card, config: T5Config, params: dict, base_path: str) -> dict:
    """The card's params in `config`'s layer layout, after checking it belongs to this base."""
    check_base(card, lora.fingerprint(params, config), base_path)
    return lora.in_layout(card.params, config)


# ---------------------------------------------------------------------------------------------
# Training only the card.
# ---------------------------------------------------------------------------------------------

class CardModel:
    """The base module as a function of the card: apply({'params': card}, ...) runs base + card.

    The train and eval steps of t5lite/train/step.py differentiate and evaluate 'params'; given
    this model, 'params' is the card, and the base is a constant of the step (an input of the
    jitted function, neither differentiated nor donated), so it has no gradient or optimizer state.
    """

    def __init__(self, module: nn.Module, spec: lora.LoraConfig, base):
        self.module, self.spec, self.base = module, spec, base

    def apply(self, variables, *args, enable_dropout: bool = False, **kwargs):
        with lora.adapted(self.spec, deterministic=not enable_dropout):
            return self.module.apply({"params": self.base, lora.COLLECTION: variables["params"]}, *args,
                                     enable_dropout=enable_dropout, **kwargs)


@dataclasses.dataclass
class CardSteps:
    """A card run's jitted steps, the base an input of each: train (state, base, batch) -> (state, metrics),
    eval (card, base, batch) -> sums. Built from shapes only, so `t5lite compile` traces them without a base."""

    spec: lora.LoraConfig
    shardings: TrainState  # of NamedShardings: the card, its optimizer state, the step
    abstract_state: TrainState  # ShapeDtypeStructs with shardings: the restore target
    new_state: Callable[[jax.Array], TrainState]  # key -> a fresh card and its optimizer state (jit it)
    train_step: Callable
    eval_step: Callable

    @property
    def num_params(self) -> int:
        return lora.num_card_params(self.abstract_state.params)


def build_card_steps(spec: lora.LoraConfig, *, config: T5Config, decoder_only: bool, module: nn.Module, optimizer,
                     mesh, rules, base_shardings, **step_kwargs: Any) -> CardSteps:
    """Checks the card's targets against the model and jits its steps (step_kwargs: loss, dropout_seed,
    num_microbatches, loss_normalizing_factor, as train_step takes them). Only the card is differentiated and
    has optimizer state; the base (sharded by `base_shardings`) is never donated."""
    if not isinstance(spec, lora.LoraConfig):
        raise UserError(f"train.adapter must be a LoraConfig (train.adapter = @LoraConfig()), got {spec!r}")
    lora.check_targets(spec, config, decoder_only)
    card_shardings = partitioning.param_shardings(lora.abstract_card(config, spec, decoder_only), mesh, rules)
    new_state = lambda key: TrainState.create(lora.init_card(config, spec, key, decoder_only), optimizer)  # noqa: E731
    shapes = jax.eval_shape(new_state, jax.random.key(0))
    opt_shardings = partitioning.opt_state_shardings(shapes.opt_state, shapes.params, card_shardings, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = TrainState(step=replicated, params=card_shardings, opt_state=opt_shardings)
    batch = partitioning.batch_sharding(mesh, rules)

    def train_step(state, base, batch):
        return step_lib.train_step(state, batch, model=CardModel(module, spec, base), optimizer=optimizer,
                                   grad_shardings=card_shardings, **step_kwargs)

    def eval_step(card, base, batch):
        return step_lib.eval_step(card, batch, model=CardModel(module, spec, base))

    train_jit = step_lib._under_mesh(jax.jit(train_step, in_shardings=(shardings, base_shardings, batch),
                                             out_shardings=(shardings, replicated), donate_argnums=(0,)), mesh, rules)
    eval_jit = step_lib._under_mesh(jax.jit(eval_step, in_shardings=(card_shardings, base_shardings, batch),
                                            out_shardings=replicated), mesh, rules)
    abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                      shardings)
    return CardSteps(spec, shardings, abstract, new_state, train_jit, eval_jit)


@dataclasses.dataclass
class CardTraining:
    """What a card run uses instead of the full model's state and steps (built by `prepare_card_training`)."""

    spec: lora.LoraConfig
    base_checkpoint: str
    base_fingerprint: str
    abstract_state: TrainState  # ShapeDtypeStructs with shardings: the restore target
    initial_state: Callable[[], TrainState]
    train_step: Callable  # (state, batch) -> (state, metrics), the base bound
    eval_step: Callable  # (card, batch) -> sums
    num_params: int
    base_params: int

    def meta(self) -> dict:
        return {"lora": self.spec.to_dict(), "base_fingerprint": self.base_fingerprint,
                "base_checkpoint": self.base_checkpoint}

    def write(self, model_dir: str, step: int, card_params, config: T5Config, decoder_only: bool, task: str,
              gin: str) -> None:
        """Writes model_dir/card (every process gathers, process 0 writes)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            card_params = multihost_utils.process_allgather(card_params, tiled=True)
        if jax.process_index() != 0:
            return
        host = jax.device_get(card_params)
        card = Card(self.spec, unscan_params(host) if config.scan_layers else host, self.base_fingerprint, config,
                    decoder_only, os.path.abspath(self.base_checkpoint), task, int(step), gin)
        save_card(os.path.join(model_dir, "card"), card)


def _check_resume(model_dir: str, fingerprint: str) -> None:
    """A card run resumed on another base would mix two bases' cards: one line, nothing touched."""
    for step_dir in step_dirs(model_dir):
        try:
            meta = read_meta(step_dir)
        except Exception:  # noqa: BLE001 - unreadable steps are the checkpointer's business
            continue
        stored = (meta.get("card") or {}).get("base_fingerprint")
        if meta.get("card") is None:
            raise UserError(f"{model_dir} holds a full-model run, not a card run; train the card into a new "
                            "--model_dir")
        if stored != fingerprint:
            raise UserError(f"{model_dir} holds a card trained on another base (fingerprint {stored}, this base "
                            f"{fingerprint}); resume with the base it started from, or use a new --model_dir")
        return


def prepare_card_training(steps: CardSteps, *, config: T5Config, base_shardings, init_checkpoint: str,
                          model_dir: str, seed: int) -> CardTraining:
    """Loads and fingerprints the base the card adapts (refusing a card run begun on another base) and binds it
    to the card's steps."""
    _, base = load_any_params(init_checkpoint, config)
    base = jax.device_put(base, base_shardings)
    fingerprint = lora.fingerprint(base, config)
    _check_resume(model_dir, fingerprint)
    return CardTraining(
        spec=steps.spec, base_checkpoint=init_checkpoint, base_fingerprint=fingerprint,
        abstract_state=steps.abstract_state,
        initial_state=lambda: jax.jit(steps.new_state, out_shardings=steps.shardings)(jax.random.key(seed)),
        train_step=lambda state, batch: steps.train_step(state, base, batch),
        eval_step=lambda card, batch: steps.eval_step(card, base, batch),
        num_params=steps.num_params, base_params=lora.num_card_params(base))
