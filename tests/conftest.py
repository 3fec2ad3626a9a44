"""Test-session setup shared by every test process.

All of them (pytest-xdist workers and the CLI subprocesses tests start, which inherit the
environment) share one persistent XLA compilation cache under .pytest_cache: the suite
compiles the same tiny-model programs many times, and a cache hit skips XLA's compile.
"""

import os

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
