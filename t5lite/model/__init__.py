"""The T5 model: config and presets, linen modules (registered in t5lite/registry.py), parameter utilities."""

# The built-in attention / MLP / norm / position modules register themselves on import.
from t5lite.model import attention, layers, longt5, moe, positions  # noqa: F401
from t5lite.model.config import PRESETS, T5Config, get_config
from t5lite.model.params import (abstract_params, count_params, init_params, logical_axes, param_shapes,
                                 scan_params, unscan_params)
from t5lite.registry import register
from t5lite.model.transformer import DecoderOnly, EncoderDecoder

__all__ = [
    "PRESETS", "T5Config", "get_config", "EncoderDecoder", "DecoderOnly", "init_params", "abstract_params",
    "logical_axes", "param_shapes", "count_params", "scan_params", "unscan_params", "register",
]
