"""t5lite: a small, fast, readable JAX/Flax T5-style encoder-decoder research codebase."""

import glob as _glob
import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _cpu_only_host_with_libtpu() -> bool:
    """libtpu installed (the [tpu] extra, for `t5lite compile`) on a host without TPU chips or GPUs.

    There jax would still try to start a TPU runtime in every process: it fails, but only after
    printing a screen of warnings and taking a host-wide lock (/tmp/libtpu_lockfile).
    """
    if _importlib_util.find_spec("libtpu") is None:
        return False
    google_pci = any(open(path).read().strip() == "0x1ae0" for path in _glob.glob("/sys/bus/pci/devices/*/vendor"))
    gpus = _glob.glob("/dev/nvidia[0-9]*") + _glob.glob("/dev/kfd")
    return not google_pci and not gpus


def _skip_absent_tpu() -> None:
    """On such a host, let jax use only its CPU backend (compiling *for* TPUs still works)."""
    if "JAX_PLATFORMS" in _os.environ or not _cpu_only_host_with_libtpu():
        return
    if "jax" not in _sys.modules:
        _os.environ["JAX_PLATFORMS"] = "cpu"
        return
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized():
        import jax
        jax.config.update("jax_platforms", "cpu")


_skip_absent_tpu()
