"""Writing output directories so that nothing is ever half-written."""

import contextlib
import os
import shutil


@contextlib.contextmanager
def new_directory(path: str):
    """Yields a temporary sibling of `path` to fill; on success it becomes `path` (absent or empty,
    which the caller checks before doing any work), on any error it is removed."""
    path = os.path.abspath(path)
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
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
