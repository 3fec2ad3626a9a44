"""`t5lite bench`: train / decode / data throughput side by side with HF (throughput.py) and adapter cards (cards.py)."""

from t5lite.bench.throughput import data_benchmark, decode_benchmark, train_benchmark

__all__ = ["data_benchmark", "decode_benchmark", "train_benchmark"]
