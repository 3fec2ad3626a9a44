"""Checkpoint formats on disk.

A *params checkpoint* (what `t5lite convert from-hf` writes, and what fine-tuning starts
from) is a directory holding `config.json` ({"format": "t5lite-params", "model": T5Config})
and `params/`, an orbax checkpoint of the unboxed float32 parameter tree. It is assembled
under a temporary name and renamed into place, so it exists whole or not at all.
"""

import json
import os
import shutil
from typing import Tuple

import flax.linen as nn
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
    config = config or stored
    if config.scan_layers != stored.scan_layers:
        params = scan_params(params) if config.scan_layers else unscan_params(params)
    return config, params
