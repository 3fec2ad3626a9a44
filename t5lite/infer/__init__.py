"""Inference: KV-cache decoding (greedy, beam, sampling) and evaluation."""

from t5lite.infer.decoding import generate

__all__ = ["generate"]
