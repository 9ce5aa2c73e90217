"""Writing files so that nothing is ever left half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync,
    rename over ``path``, fsync the directory. Readers see the old file or the new one,
    never a torn one; the temp file never outlives a failure. Raises ``OSError``."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """fsync a directory so a rename in it survives a crash (best effort off POSIX)."""
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


CACHE_ROOT_ENV = "WARMPLAN_CACHE_ROOT"


def default_cache_root() -> str:
    """``$WARMPLAN_CACHE_ROOT`` when set, else ``~/.cache/warmplan`` (absolute): the
    one default for every cache warmplan keeps."""
    root = os.environ.get(CACHE_ROOT_ENV) or os.path.join("~", ".cache", "warmplan")
    return os.path.abspath(os.path.expanduser(root))
