"""Checkpoint formats on disk, and reading them safely.

A *training checkpoint* is `model_dir/checkpoints/<step>/` (see TrainCheckpointer). A
*params checkpoint* (what `t5lite convert from-hf` writes, and what fine-tuning starts
from) is a directory holding `config.json` ({"format": "t5lite-params", "model": T5Config})
and `params/`, an orbax checkpoint of the unboxed float32 parameter tree. It is assembled
under a temporary name and renamed into place, so it exists whole or not at all.

Every reader falls back from an unreadable step to the previous one with a warning. A step
that is readable but holds another model is never "unreadable": it is a configuration error
(UserError naming the differing parameter), and nothing is touched.
"""

import base64
import json
import logging
import os
import shutil
from typing import Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from t5lite.errors import UserError
from t5lite.fileio import nearest_existing, new_directory
from t5lite.model import T5Config, abstract_params, scan_params, unscan_params
from t5lite.model.params import attention_in_layout
from t5lite.train.data_checkpoint import (DataPositionMismatch, DataPositionRestore, DataPositionSave, data_changes,
                                          data_mismatch)

PARAMS_FORMAT = "t5lite-params"
TRAIN_FORMAT = "t5lite-train"
UNREADABLE_SUFFIX = ".unreadable"  # a bad step is renamed <step>.unreadable: kept, but no longer a step

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Does a checkpoint fit the configured model? Shapes by path, compared before any restore.
# ---------------------------------------------------------------------------------------------

def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat_shapes(tree) -> Dict[str, Tuple[int, ...]]:
    """{'params/encoder/layers_0/mlp/wi_0/kernel': (64, 128), ...} for arrays, abstract arrays or
    orbax array metadata; NamedTuple fields and list indices become path parts like dict keys."""
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
    return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def _config_differences(stored: Optional[dict], wanted: Optional[T5Config]) -> str:
    if not stored or wanted is None:
        return ""
    ours = wanted.to_dict()
    diffs = [f"{k} {stored[k]!r} there, {ours[k]!r} here" for k in sorted(ours)
             if k in stored and stored[k] != ours[k] and k not in ("dtype", "remat_policy", "dropout_rate")]
    return f" (the model config differs: {'; '.join(diffs)})" if diffs else ""


def shape_mismatch(stored: Dict[str, tuple], wanted: Dict[str, tuple]) -> Optional[str]:
    """A short description of the first difference between two {path: shape} maps, or None."""
    for path in sorted(wanted):
        if path in stored and stored[path] != wanted[path]:
            return f"{path} is {list(stored[path])} there but {list(wanted[path])} here"
    missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing:
        return f"{missing[0]} is missing there" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    if extra:
        return f"{extra[0]} is there but not in the configured model" + (
            f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    return None


def check_fits(what: str, stored: Dict[str, tuple], wanted: Dict[str, tuple], stored_model: Optional[dict],
               wanted_model: Optional[T5Config], fix: str) -> None:
    """UserError naming the first differing parameter when `stored` does not fit `wanted`."""
    mismatch = shape_mismatch(stored, wanted)
    if mismatch:
        raise UserError(f"{what} does not fit the configured model: {mismatch}"
                        f"{_config_differences(stored_model, wanted_model)}; {fix}")


# ---------------------------------------------------------------------------------------------
# Params checkpoints: config.json + params/.
# ---------------------------------------------------------------------------------------------

def save_params(path: str, config: T5Config, params: dict) -> None:
    """Writes a params checkpoint to the (new or empty) directory `path`."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise UserError(f"output directory {path} is not empty; choose a new --out or remove it")
    with new_directory(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"format": PARAMS_FORMAT, "model": config.to_dict()}, f, indent=2)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), params)
            ckptr.wait_until_finished()


def is_params_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_config(path: str) -> T5Config:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not a t5lite params checkpoint (no readable config.json); "
                        "create one with `t5lite convert from-hf` or point at a training checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != PARAMS_FORMAT:
        raise UserError(f"{cfg_path} is not a t5lite params checkpoint config; create one with `t5lite convert "
                        "from-hf` or point at a training model_dir")
    return T5Config.from_dict(meta["model"])


def _single_device_target(config: T5Config, decoder_only: bool = False):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                  nn.meta.unbox(abstract_params(config, decoder_only)))


def load_params(path: str, config: T5Config = None) -> Tuple[T5Config, dict]:
    """Reads a params checkpoint -> (config, params) on the default device.

    `config` (e.g. the stored one with another dtype or scan_layers) overrides the stored one;
    the layers are restacked when scan_layers differs.
    """
    stored = load_config(path)
    params_dir = os.path.join(os.path.abspath(path), "params")
    if not os.path.isdir(params_dir):
        raise UserError(f"{path} has no params/ directory; the checkpoint is incomplete, re-create it")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(params_dir, _single_device_target(stored))
    except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged files
        raise UserError(f"{params_dir} is unreadable ({_first_line(e)}); re-create the checkpoint") from None
    return _in_layout(config or stored, stored, params)


def _in_layout(config: T5Config, stored: T5Config, params: dict) -> Tuple[T5Config, dict]:
    """Restacks the layers when the wanted config's scan_layers differs from the stored one, and reshapes the
    attention kernels when its attention_layout does (checkpoints saved before the joined layout)."""
    if config.scan_layers != stored.scan_layers:
        params = scan_params(params, config.layers_per_scan_block) if config.scan_layers else unscan_params(params)
    if config.attention_layout != stored.attention_layout:
        params = attention_in_layout(params, config)
    return config, params


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Training checkpoints: model_dir/checkpoints/<step>/{state, data, meta}
# ---------------------------------------------------------------------------------------------

def checkpoint_meta(config: T5Config, operative_gin: str = "", vocab_bytes: Optional[bytes] = None,
                    decoder_only: bool = False) -> dict:
    """What travels with every training checkpoint besides the arrays."""
    return {"format": TRAIN_FORMAT, "model": config.to_dict(), "decoder_only": bool(decoder_only),
            "gin": operative_gin, "vocab": base64.b64encode(vocab_bytes).decode("ascii") if vocab_bytes else None}


def _checkpoints_dir(path: str) -> Optional[str]:
    """model_dir or model_dir/checkpoints -> the directory holding the <step> directories."""
    for candidate in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(candidate) and any(d.isdigit() for d in os.listdir(candidate)):
            return candidate
    return None


def step_dirs(path: str) -> List[str]:
    """Step directories under a model_dir (or its checkpoints/, or one step directory), newest first."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
        return [path]
    directory = _checkpoints_dir(path)
    if directory is None:
        return []
    steps = sorted((int(d) for d in os.listdir(directory) if d.isdigit()), reverse=True)
    return [os.path.join(directory, str(s)) for s in steps]


def read_meta(step_dir: str) -> dict:
    """The JSON meta item of a training checkpoint step (raises on a damaged file)."""
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("format") != TRAIN_FORMAT or "model" not in meta:
        raise ValueError("meta is not a t5lite training checkpoint's")
    return meta


def stored_state_shapes(step_dir: str) -> Dict[str, tuple]:
    """{path: shape} of the train state saved in a step, from orbax's metadata (no arrays read)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(os.path.join(step_dir, "state"))
    shapes = flat_shapes(getattr(metadata, "item_metadata", metadata))
    if not shapes:  # orbax answers a damaged metadata file with an empty tree, not an error
        raise ValueError("the train state's metadata is missing or damaged")
    return shapes


def decoder_only_of(meta: dict, params: Optional[dict] = None) -> bool:
    """Whether a checkpoint holds a DecoderOnly model (older checkpoints: no 'encoder' params)."""
    if "decoder_only" in meta:
        return bool(meta["decoder_only"])
    return params is not None and "encoder" not in params


def _restore_params(step_dir: str, config: T5Config, decoder_only: bool) -> dict:
    target = _single_device_target(config, decoder_only)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)},
            partial_restore=True))
    return restored["params"]


def load_train_checkpoint_params(path: str, step: Optional[int] = None) -> Tuple[T5Config, dict, dict]:
    """Params (on the default device), config and meta of the newest readable training checkpoint
    under `path` (or of `step`). Unreadable steps are skipped with a warning.

    The optimizer state is not needed (fine-tuning may use another optimizer), so only the
    'params' subtree is restored."""
    candidates = step_dirs(path)
    if step is not None:
        candidates = [d for d in candidates if os.path.basename(d) == str(step)]
        if not candidates:
            raise UserError(f"{path} has no checkpoint of step {step}; its steps are "
                            f"{[int(os.path.basename(d)) for d in step_dirs(path)] or 'none'}")
    if not candidates:
        raise UserError(f"{path} holds no t5lite checkpoint (expected config.json + params/, or a model_dir "
                        "with checkpoints/<step>/)")
    failures = []
    for step_dir in candidates:
        try:
            meta = read_meta(step_dir)
            config = T5Config.from_dict(meta["model"])
            params = _restore_params(step_dir, config, decoder_only_of(meta))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any damage to a step falls back to the previous one
            _raise_if_denied(step_dir, e)
            log.warning("checkpoint %s is unreadable (%s); trying the previous step", step_dir, _first_line(e))
            failures.append(os.path.basename(step_dir))
            continue
        if failures:
            log.warning("using checkpoint %s instead of the unreadable step(s) %s", step_dir, ", ".join(failures))
        return config, params, meta
    raise UserError(f"no readable checkpoint under {path}: step(s) {', '.join(failures)} are damaged; "
                    "restore them from a backup or train again")


def load_any_params(path: str, config: Optional[T5Config] = None) -> Tuple[T5Config, dict]:
    """A params checkpoint (`t5lite convert from-hf`) or a training checkpoint -> (config, params)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; pass a training model_dir or a converted checkpoint")
    if is_params_checkpoint(path):
        return load_params(path, config)
    stored, params, _ = load_train_checkpoint_params(path)
    return _in_layout(config or stored, stored, params)


def stored_model(path: str) -> Tuple[T5Config, bool, Optional[dict]]:
    """(config, decoder_only, meta or None) of a checkpoint, without reading its arrays."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; pass a training model_dir or a converted checkpoint")
    if is_params_checkpoint(path):
        return load_config(path), False, None
    for step_dir in step_dirs(path):
        try:
            meta = read_meta(step_dir)
        except Exception as e:  # noqa: BLE001
            _raise_if_denied(step_dir, e)
            log.warning("checkpoint %s is unreadable (%s); trying the previous step", step_dir, _first_line(e))
            continue
        return T5Config.from_dict(meta["model"]), decoder_only_of(meta), meta
    raise UserError(f"{path} holds no readable t5lite checkpoint (expected config.json + params/, or a model_dir "
                    "with checkpoints/<step>/)")



# ---------------------------------------------------------------------------------------------
# Errors that are not damage.
# ---------------------------------------------------------------------------------------------

def _raise_if_denied(step_dir: str, error: BaseException) -> None:
    denied = permission_error(error)
    if denied is not None:
        raise UserError(f"cannot read checkpoint {step_dir}: permission denied on {denied}; fix its permissions "
                        "(chmod/chown) and run again (nothing was changed)") from None


def permission_error(error: BaseException) -> Optional[str]:
    """The path (or message) of a permission error anywhere in `error`'s chain, else None. orbax and
    tensorstore wrap the OSError, or only keep its text."""
    for cause in _chain(error):
        if isinstance(cause, PermissionError):
            return cause.filename or str(cause)
        text = str(cause)
        if "Permission denied" in text or "PERMISSION_DENIED" in text:
            return text.strip().splitlines()[0][:200]
    return None


def _chain(error: BaseException):
    """`error`, then its causes (explicit or implicit), each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


class TrainCheckpointer:
    """orbax CheckpointManager over `model_dir/checkpoints`: train state (sharded arrays), the
    data position (one state per virtual data shard, t5lite/train/data_checkpoint.py), and meta
    (model config, operative gin config, vocabulary), saved asynchronously. orbax finalises a step by renaming it into place, so a
    killed save never shows up as a step.

    Restoring walks the steps newest first. A step whose saved shapes differ from the configured
    model is a UserError (nothing touched). A step that cannot be read is renamed
    `<step>.unreadable` (kept for inspection, no longer a step, so training continues past it
    without colliding) and the previous one is tried.
    """

    def __init__(self, model_dir: str, *, max_to_keep: int = 2, keep_period: Optional[int] = None,
                 async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(model_dir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = _Manager(self.directory, options=options, item_names=("state", "data", "meta"))
        self._pending: Optional[int] = None  # the step whose background save has not been checked yet

    def save(self, step: int, state, data_iterator, meta: dict) -> None:
        """Starts saving `step` (finished in the background); a failure now or of an earlier save is a
        SaveFailed naming the step, the directory and its free space."""
        if self._pending is not None:
            self.wait()  # orbax would wait for the previous save too; its outcome is checked here
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=DataPositionSave(data_iterator.get_state(), primary=jax.process_index() == 0),
                                  meta=ocp.args.JsonSave(meta))
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - disk full, permissions, quota, a vanished directory
            raise self._save_failed(step, e) from None
        self._pending = step

    def check(self) -> None:
        """Raises SaveFailed once a background save has failed (cheap while none is pending). orbax's
        finalising thread takes the error itself (logging it, not raising it): _Manager keeps it, and a
        step that is not on disk once its save ended failed too."""
        if self._pending is None or self._manager.is_saving_in_progress():
            return
        step, self._pending = self._pending, None
        try:
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(step, e) from None
        error, self._manager.background_error = self._manager.background_error, None
        if error is not None:
            raise self._save_failed(step, error)
        if jax.process_index() == 0 and not os.path.isdir(os.path.join(self.directory, str(step))):
            raise self._save_failed(step, RuntimeError("the step was not finalised on disk"))

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            step, self._pending = self._pending, None
            raise self._save_failed(step, e) from None
        self.check()

    def _save_failed(self, step: Optional[int], error: BaseException) -> "SaveFailed":
        kept = [s for s in self._safe_steps() if s != step]
        return SaveFailed(f"saving checkpoint step {step} to {self.directory} failed ({_first_line(_root(error))}); "
                          f"{_free_space(self.directory)}; training stopped at that step, earlier checkpoints are "
                          f"kept ({', '.join(map(str, kept)) or 'none'}): free space or fix the directory's "
                          "permissions, then run the same command to resume")

    def _safe_steps(self):
        try:
            return sorted(int(d) for d in os.listdir(self.directory) if d.isdigit())
        except OSError:
            return []

    def steps(self):
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state, data_iterator, config: Optional[T5Config] = None,
                       data_settings: Optional[dict] = None, reset_data: bool = False
                       ) -> Optional[Tuple[int, object, dict]]:
        """(step, state, meta) of the newest readable checkpoint, the iterator moved to its position;
        None when there is none. `abstract_state` holds ShapeDtypeStructs with the target shardings
        (any mesh: orbax reshards on restore); `config` names the differences in a mismatch.

        `data_settings` (what the data position depends on, see checks.data_settings) are compared with
        the ones the step recorded: a difference is a UserError naming it, unless `reset_data`, which
        restores the state and starts the data from its beginning. A step without a record (written
        before t5lite recorded them) is restored as before: unknown is not a mismatch."""
        wanted = flat_shapes(abstract_state)
        for step in reversed(self.steps()):
            step_dir = os.path.join(self.directory, str(step))
            try:
                meta, stored = read_meta(step_dir), stored_state_shapes(step_dir)
            except Exception as e:  # noqa: BLE001 - damaged metadata: an unreadable step
                self._unreadable(step, e)
                continue
            check_fits(f"checkpoint step {step} in {self.directory}", stored, wanted, meta.get("model"), config,
                       "train into a new --model_dir, or configure the model and optimizer this run was "
                       "started with")
            changed = data_changes(meta.get("data"), data_settings)
            if changed and not reset_data:
                raise UserError(data_mismatch(step, self.directory, changed))
            skip_data = bool(changed)
            if changed:
                log.warning("train.reset_data: the data settings changed since step %d (%s); the state is "
                            "restored and the data starts from its beginning", step, changed)
            try:
                restored = self._restore(step, abstract_state, data_iterator, skip_data)
            except DataPositionMismatch as e:
                if not reset_data:
                    raise UserError(data_mismatch(step, self.directory, str(e))) from None
                log.warning("train.reset_data: the saved data position does not fit this pipeline (%s); the "
                            "state is restored and the data starts from its beginning", e)
                restored = self._restore(step, abstract_state, data_iterator, skip_data=True)
            except UserError:
                raise  # readable, but saved with other settings (e.g. the data shards): a configuration error
            except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous one
                self._unreadable(step, e)
                continue
            return step, restored["state"], restored["meta"]
        return None

    def _restore(self, step: int, abstract_state, data_iterator, skip_data: bool) -> dict:
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if not skip_data:
            items["data"] = DataPositionRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))

    def _unreadable(self, step: int, error: BaseException) -> None:
        """A step that cannot be read: set aside when its bytes are damaged; a permission error is the
        user's to fix, so it stops the run with the path and nothing is renamed."""
        _raise_if_denied(os.path.join(self.directory, str(step)), error)
        self._set_aside(step, error)

    def _set_aside(self, step: int, error: BaseException) -> None:
        """Renames an unreadable step to <step>.unreadable (process 0), so a later save of that step
        does not collide with it, and forgets it."""
        source = os.path.join(self.directory, str(step))
        target, n = source + UNREADABLE_SUFFIX, 1
        while os.path.exists(target):
            n += 1
            target = f"{source}{UNREADABLE_SUFFIX}-{n}"
        log.warning("checkpoint step %d in %s is unreadable (%s); kept as %s, trying the previous step",
                    step, self.directory, _first_line(error), os.path.basename(target))
        if jax.process_index() == 0:
            os.rename(source, target)
        _barrier(f"t5lite_set_aside_{step}")
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


class _Manager(ocp.CheckpointManager):
    """Keeps the error of a background save, which orbax's finalising thread would only log."""

    background_error: Optional[BaseException] = None

    def check_for_errors(self):
        try:
            super().check_for_errors()
        except Exception as e:
            self.background_error = e
            raise


class SaveFailed(UserError):
    """A checkpoint could not be written (disk full, permissions, quota): the run stops at that step."""


def _root(error: BaseException) -> BaseException:
    """The OSError behind orbax's wrappers, if there is one (its text names errno and path)."""
    return next((cause for cause in _chain(error) if isinstance(cause, OSError)), error)


def _free_space(directory: str) -> str:
    """'1.2 GiB free of 50 GiB on <the disk holding directory>' (or why it is unknown)."""
    path = nearest_existing(directory)
    try:
        usage = shutil.disk_usage(path)
    except OSError as e:
        return f"free space unknown ({e.strerror})"
    return f"{usage.free / 2**30:.3g} GiB free of {usage.total / 2**30:.3g} GiB on the disk holding {path}"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


__all__ = ["save_params", "load_params", "load_any_params", "load_train_checkpoint_params", "stored_model",
           "TrainCheckpointer", "checkpoint_meta", "check_fits", "flat_shapes"]
