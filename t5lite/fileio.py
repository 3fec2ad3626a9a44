"""Writing outputs so that nothing is ever half-written, and checking output paths before any work.

The only place that writes files atomically: a temporary sibling is filled, then renamed into place.
"""

import contextlib
import os
import shutil
from typing import Iterable, Sequence

from t5lite.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_default_mode(path: str) -> None:
    """Gives a file the mode a plain open() would (0666 less the umask): some writers (safetensors,
    mkstemp) create files 0600, which other users of a shared checkpoint could not read."""
    os.chmod(path, 0o666 & ~_umask())


def nearest_existing(path: str) -> str:
    """`path` if it exists, else its nearest existing ancestor (what creating it would write into)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return existing


def _check_parent(path: str, flag: str) -> None:
    """The nearest existing ancestor of `path` is a writable directory (so the parents can be created)."""
    parent = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: directory {parent} is not writable; choose another {flag}")


def check_output_file(path: str, flag: str, inputs: Sequence[str] = ()) -> None:
    """Before any work: `path` can be written as a file (not a directory, not read-only, not one of the
    `inputs`, its parent exists or can be created). Raises UserError naming `flag`."""
    if not path:
        raise UserError(f"{flag} is empty; give a file path")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file path")
    for source in filter(None, inputs):
        same = os.path.realpath(source) == os.path.realpath(path) or (
            os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path))  # hard links too
        if same:
            raise UserError(f"{flag} {path} is the input file; write the output to another path")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} is read-only; choose another {flag} or make it writable")
    _check_parent(path, flag)


def check_output_dir(path: str, flag: str) -> None:
    """Before any work: `path` is absent or an empty directory, and its parent exists or can be created."""
    if not path:
        raise UserError(f"{flag} is empty; give a directory path")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"{flag} {path} is an existing file; choose a new directory")
        if os.listdir(path):
            raise UserError(f"output directory {path} is not empty; choose a new {flag} or remove it")
    _check_parent(path, flag)


def write_lines(path: str, lines: Iterable[str]) -> None:
    """Writes `lines` (each ending in a newline) to `path` atomically, creating its parents: a failure
    leaves any old file intact and no partial one."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _replace(path, lambda f: f.writelines(lines))


@contextlib.contextmanager
def new_directory(path: str):
    """Yields a temporary sibling of `path` to fill; on success it becomes `path` (absent or empty,
    which the caller checks before doing any work), on any error it is removed."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path} is an existing file; choose a new directory")
    tmp = f"{path.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier run of this pid
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(path):
            os.rmdir(path)  # empty: checked by the caller
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Replaces the file `path` with `text` at once: readers see the old or the new content, never a
    mix, and a crash mid-write leaves the old file."""
    _replace(os.path.abspath(path), lambda f: f.write(text))


def _replace(path: str, write) -> None:
    """write(f) fills a temporary sibling of `path`, which is synced and then renamed over `path`; on any
    error the sibling is removed and `path` is left as it was."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
