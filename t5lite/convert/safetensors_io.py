"""Minimal safetensors reading (single file or sharded index) and writing with NumPy.

Reads the header ourselves so bfloat16 tensors load too (NumPy has no bf16; ml_dtypes,
which jax depends on, provides it). Tensors are memory-mapped, so an xxl checkpoint is
not read into memory all at once.
"""

import json
import os
import struct
from typing import Dict

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from t5lite.errors import UserError
from t5lite.fileio import set_default_mode

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _damaged(path: str, why: str) -> UserError:
    return UserError(f"{path} is not a readable safetensors file ({why}); it may be truncated or damaged: "
                     "re-download it or re-save it with save_pretrained")


def _read_file(path: str) -> Dict[str, np.ndarray]:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise _damaged(path, f"its header claims {header_len} bytes but the file has {size}")
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _damaged(path, str(e)) from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if size > 8 + header_len else \
        np.zeros((0,), np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise _damaged(path, f"tensor {name!r} has no valid dtype / shape / data_offsets") from None
        if dtype not in _DTYPES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        expected = int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != expected:
            raise _damaged(path, f"tensor {name!r} needs bytes {begin}..{end} of {len(data)}")
        out[name] = data[begin:end].view(_DTYPES[dtype]).reshape(shape)
    return out


def read_safetensors(directory: str) -> Dict[str, np.ndarray]:
    """All tensors of `directory/model.safetensors` or of the shards its index names."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return _read_file(single)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is not a readable safetensors index ({e}); re-save the checkpoint") from None
        tensors: Dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(_read_file(os.path.join(directory, shard)))
        return tensors
    hint = " (found pytorch_model.bin: re-save it with save_pretrained(..., safe_serialization=True))" \
        if os.path.isfile(os.path.join(directory, "pytorch_model.bin")) else ""
    raise UserError(f"{directory} has no model.safetensors{hint}")


def write_safetensors(tensors: Dict[str, np.ndarray], path: str) -> None:
    save_file(tensors, path, metadata={"format": "pt"})
    set_default_mode(path)  # safetensors creates it 0600
