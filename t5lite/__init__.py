"""t5lite: a small, fast, readable JAX/Flax T5-style encoder-decoder research codebase."""

import glob as _glob
import importlib.util as _importlib_util
import os as _os
import sys as _sys



def _version() -> str:
    """pyproject.toml is the one source: read it in a checkout (where an editable install's metadata may be
    stale), else the installed distribution's metadata (a wheel)."""
    pyproject = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "pyproject.toml")
    if _os.path.isfile(pyproject):
        import tomllib
        try:
            with open(pyproject, "rb") as f:
                project = tomllib.load(f).get("project", {})
            if project.get("name") == "t5lite" and isinstance(project.get("version"), str):
                return project["version"]
        except (OSError, ValueError):
            pass
    import importlib.metadata
    try:
        return importlib.metadata.version("t5lite")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


__version__ = _version()


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
