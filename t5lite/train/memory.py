"""Out of memory in a training program: recognise it, measure what the program needs, find a batch that fits.

XLA reports a program that does not fit the device as RESOURCE_EXHAUSTED (at compile time on
TPU, at run time on CPU and GPU); the host reports it as MemoryError. `explain` turns it into one
line: the program, what it needs against what the device has (XLA's memory analysis of the compiled
program; the device's bytes_limit, or the host's available memory for the CPU backend), what to
lower, and where a search of a few compiles finds one, the largest global batch that fits.
"""

import logging
import os
import re
import resource
from typing import Callable, Dict, Optional

import jax

log = logging.getLogger(__name__)
GIB = 2**30
_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "Ran out of memory", "Resource exhausted",
            "failed to allocate", "Failed to allocate", "bad_alloc")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    text = f"{type(error).__name__}: {error}"
    return any(marker in text for marker in _MARKERS)


def device_memory_bytes() -> Optional[int]:
    """What one device may use: its bytes_limit (GPU / TPU), the host's available memory (CPU: within this
    process's `ulimit -v`), or None."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if jax.default_backend() == "cpu":
        return _host_available()
    return None


def _host_available() -> Optional[int]:
    """The host's MemAvailable, or less under an address-space limit (`ulimit -v`): what is left of it."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            available = min(available, max(0, limit - used))
        except (OSError, ValueError):
            pass
    return available


def program_bytes(compiled) -> Optional[int]:
    """Bytes one device needs to run a compiled program, from XLA's memory analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    peak = getattr(stats, "peak_memory_in_bytes", 0) or 0
    live = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)
    return int(max(peak, live) + stats.generated_code_size_in_bytes)


def largest_batch(fits: Callable[[int], bool], unit: int, start: int, max_compiles: int = 8) -> dict:
    """The largest multiple of `unit` for which `fits(batch)` holds: doubling from `start` while it fits,
    halving while it does not, then bisecting the gap; at most `max_compiles` calls.
    -> {'largest': b or None, 'tried': {batch: fits}, 'exact': bool}."""
    tried: Dict[int, bool] = {}

    def probe(batch: int) -> bool:
        tried[batch] = fits(batch)
        return tried[batch]

    low, high = 0, None  # the largest batch known to fit, the smallest known not to
    batch = max(unit, start // unit * unit)
    while len(tried) < max_compiles:
        if probe(batch):
            low = batch
            if high is not None:
                break
            batch *= 2
        else:
            high = batch
            if low or batch <= unit:
                break
            batch = max(unit, batch // 2 // unit * unit)
    while high is not None and low and high - low > unit and len(tried) < max_compiles:
        middle = max(unit, (low + high) // 2 // unit * unit)
        low, high = (middle, high) if probe(middle) else (low, middle)
    return {"largest": low or None, "tried": dict(sorted(tried.items())),
            "exact": high is not None and high - low <= unit}


def explain(program: str, error: BaseException, *, lower: Optional[Callable[[int], object]] = None,
            batch_size: Optional[int] = None, unit: int = 1, max_compiles: int = 5) -> str:
    """One line for an out-of-memory `error` of `program` ('train step', 'eval step'). `lower(batch)`
    lowers the program for a global batch (None: no measurement)."""
    available = device_memory_bytes()
    need = fit = None
    if lower is not None and batch_size:
        try:
            need = program_bytes(lower(batch_size).compile())
            if available:
                fit = largest_batch(lambda b: (program_bytes(lower(b).compile()) or 0) <= available, unit,
                                    batch_size // 2 or unit, max_compiles)["largest"]
        except Exception as e:  # noqa: BLE001 - measuring is a hint; the error is reported anyway
            log.warning("could not measure the %s's memory: %s", program, str(e).splitlines()[0][:200] if str(e) else e)
    if need is None:  # XLA's own message often names the allocation that failed
        sizes = re.findall(r"allocat\w* (\d+) bytes", str(error))
        need = int(sizes[0]) if sizes else None
    where = "the device" if jax.default_backend() != "cpu" else "the host"
    amounts = (f": it needs {_gib(need)} and {where} has {_gib(available)} available" if need and available
               else f": it needs {_gib(need)}" if need else "")
    hint = f" (BATCH_SIZE {fit} fits, by XLA's memory analysis)" if fit and fit < (batch_size or 0) else ""
    return (f"out of memory in the {program}{amounts}; lower BATCH_SIZE{hint} or TASK_FEATURE_LENGTHS, raise "
            "train.num_microbatches, or set T5Config.remat_policy = 'full'")


def _gib(n) -> str:
    return f"{n / GIB:.3g} GiB" if n is not None else "?"
