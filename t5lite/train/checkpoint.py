"""Checkpoint formats on disk.

A *training checkpoint* is `model_dir/checkpoints/<step>/` (see TrainCheckpointer). A
*params checkpoint* (what `t5lite convert from-hf` writes, and what fine-tuning starts
from) is a directory holding `config.json` ({"format": "t5lite-params", "model": T5Config})
and `params/`, an orbax checkpoint of the unboxed float32 parameter tree. It is assembled
under a temporary name and renamed into place, so it exists whole or not at all.
"""

import base64
import json
import logging
import os
import shutil
from typing import Optional, Tuple

import flax.linen as nn
import grain
import grain.checkpoint  # noqa: F401 - registers grain's orbax handlers
import jax
import orbax.checkpoint as ocp

from t5lite.errors import UserError
from t5lite.model import T5Config, abstract_params, scan_params, unscan_params

PARAMS_FORMAT = "t5lite-params"


def save_params(path: str, config: T5Config, params: dict) -> None:
    """Writes a params checkpoint to the (new or empty) directory `path`."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise UserError(f"output directory {path} is not empty; choose a new --out or remove it")
    tmp = f"{path.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"format": PARAMS_FORMAT, "model": config.to_dict()}, f, indent=2)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), params)
            ckptr.wait_until_finished()
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_config(path: str) -> T5Config:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path} is not a t5lite params checkpoint (no readable config.json); "
                        "create one with `t5lite convert from-hf` or point at a training checkpoint") from None
    if meta.get("format") != PARAMS_FORMAT:
        raise UserError(f"{cfg_path} is not a t5lite params checkpoint config (format {meta.get('format')!r})")
    return T5Config.from_dict(meta["model"])


def load_params(path: str, config: T5Config = None) -> Tuple[T5Config, dict]:
    """Reads a params checkpoint -> (config, params) on the default device.

    `config` (e.g. the stored one with another dtype or scan_layers) overrides the stored one;
    the layers are restacked when scan_layers differs.
    """
    stored = load_config(path)
    params_dir = os.path.join(os.path.abspath(path), "params")
    if not os.path.isdir(params_dir):
        raise UserError(f"{path} has no params/ directory; the checkpoint is incomplete, re-create it")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    nn.meta.unbox(abstract_params(stored)))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir, target)
    return _in_layout(config or stored, stored, params)


def _in_layout(config: T5Config, stored: T5Config, params: dict) -> Tuple[T5Config, dict]:
    """Restacks the layers when the wanted config's scan_layers differs from the stored one."""
    if config.scan_layers != stored.scan_layers:
        params = scan_params(params, config.layers_per_scan_block) if config.scan_layers else unscan_params(params)
    return config, params


# ---------------------------------------------------------------------------------------------
# Training checkpoints: model_dir/checkpoints/<step>/{state, data, meta}
# ---------------------------------------------------------------------------------------------

class TrainCheckpointer:
    """orbax CheckpointManager over `model_dir/checkpoints`: train state (sharded arrays),
    every process's data-iterator state (grain), and meta (model config, operative gin config,
    vocabulary), saved asynchronously. orbax finalises a step by renaming it into place, so a
    killed save never shows up as a step; a step that exists but cannot be read is skipped for
    the previous one with a warning.
    """

    def __init__(self, model_dir: str, *, max_to_keep: int = 2, keep_period: Optional[int] = None,
                 async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(model_dir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def save(self, step: int, state, data_iterator, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def steps(self):
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state, data_iterator) -> Optional[Tuple[int, object, dict]]:
        """(step, state, meta) of the newest readable checkpoint, the iterator moved to its position;
        None when there is none. `abstract_state` holds ShapeDtypeStructs with the target shardings
        (any mesh: orbax reshards on restore)."""
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous one
                logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                                step, self.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                continue
            return step, restored["state"], restored["meta"]
        return None

    def close(self) -> None:
        self._manager.close()


def checkpoint_meta(config: T5Config, operative_gin: str = "", vocab_bytes: Optional[bytes] = None) -> dict:
    """What travels with every training checkpoint besides the arrays."""
    return {"format": "t5lite-train", "model": config.to_dict(), "gin": operative_gin,
            "vocab": base64.b64encode(vocab_bytes).decode("ascii") if vocab_bytes else None}


def _latest_step_dir(path: str) -> Optional[str]:
    """model_dir, model_dir/checkpoints or a step directory -> the newest step directory."""
    for candidate in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(candidate):
            steps = sorted((int(d) for d in os.listdir(candidate) if d.isdigit()), reverse=True)
            if steps:
                return os.path.join(candidate, str(steps[0]))
    if os.path.isdir(os.path.join(path, "state")):
        return path
    return None


def load_train_checkpoint_params(path: str) -> Tuple[T5Config, dict, dict]:
    """Params (on the default device), config and meta of the newest training checkpoint under `path`.

    The optimizer state is not needed (fine-tuning may use another optimizer), so only the
    'params' subtree is restored."""
    step_dir = _latest_step_dir(os.path.abspath(path))
    if step_dir is None or not os.path.isfile(os.path.join(step_dir, "meta", "metadata")):
        raise UserError(f"{path} holds no t5lite checkpoint (expected config.json + params/ or checkpoints/<step>/)")
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)
    config = T5Config.from_dict(meta["model"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    nn.meta.unbox(abstract_params(config)))
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)},
            partial_restore=True))
    return config, restored["params"], meta


def load_any_params(path: str, config: Optional[T5Config] = None) -> Tuple[T5Config, dict]:
    """A params checkpoint (`t5lite convert from-hf`) or a training checkpoint -> (config, params)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_params(path, config)
    stored, params, _ = load_train_checkpoint_params(path)
    return _in_layout(config or stored, stored, params)
