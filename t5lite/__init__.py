"""t5lite: a small, fast, readable JAX/Flax T5-style encoder-decoder research codebase."""

__version__ = "0.1.0"
