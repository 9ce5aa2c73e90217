"""Writing files so that nothing is ever left half-written, and only where asked.

Two writers:

``atomic_write``
    For files an operator names (``--report``, ``schema --write``, ``suggest --out``):
    a regular file is replaced atomically (temp file beside it, fsync, rename, fsync
    of the directory); a symbolic link is followed and its target replaced, the link
    kept; a device, FIFO or socket (``/dev/null``, ``/dev/stdout``) is written through,
    never replaced; a directory is an error. A link or special file owned by another
    user (not root) is refused: in /tmp it could send the write anywhere. A regular file that is writable in a
    directory that is not is written in place (the only non-atomic case).
``replace_file``
    For files warmplan owns (autotune caches): always temp file + rename over the
    name, so a link or special file planted at the name is replaced, never followed.

Both create files with the process's umask (``0o666 & ~umask``) and keep the mode of
a regular file they replace. ``check_writable`` says, before any work, whether
``atomic_write`` can write a path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import time

from warmplan.errors import UserError

CACHE_ROOT_ENV = "WARMPLAN_CACHE_ROOT"

# A temp file this old beside a file warmplan writes was left by a killed writer.
STALE_TEMP_S = 600


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to the operator-named ``path`` (see the module docstring).
    Raises ``OSError`` naming what is wrong."""
    target = _checked_target(os.fspath(path))
    refuse_foreign(target)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        _write_through(target, data)
        return
    # A link to a regular file (or a dangling one): replace the file it names.
    real = os.path.realpath(target) if os.path.islink(target) else target
    try:
        _replace(real, data, mode=None if st is None else stat.S_IMODE(st.st_mode))
    except PermissionError:
        if st is None or not os.access(real, os.W_OK):
            raise
        _write_in_place(real, data)


def replace_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` by temp file + rename over the name, whatever is
    there (never following a link). Temp files left by killed writers are removed.
    Raises ``OSError``."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(target)
    try:
        mode = stat.S_IMODE(os.lstat(target).st_mode) if os.path.isfile(target) else None
    except OSError:
        mode = None
    _replace(target, data, mode=mode)


def refuse_foreign(target: str) -> None:
    """A link or special file at ``target`` is followed or written through only when
    this process's user or root owns it: in a shared directory (/tmp) another user
    could otherwise plant a link that sends a report over a file of their choosing
    (with root's rights, any file). Raises ``PermissionError`` naming the owner."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        return
    if st.st_uid not in (os.geteuid(), 0):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a special file"
        raise PermissionError(
            errno.EPERM,
            f"{kind} owned by uid {st.st_uid}, neither this user ({os.geteuid()}) nor root; "
            "warmplan does not follow or write through it",
            target,
        )


def check_writable(path: str | os.PathLike[str]) -> str | None:
    """Why ``atomic_write`` could not write ``path``, or ``None`` when it can: a
    directory, a trailing slash, a missing or unwritable parent directory. Checked
    before a long run, so that its result is not lost at the end."""
    name = os.fspath(path)
    try:
        refuse_foreign(_checked_target(name))
    except OSError as exc:
        return exc.strerror or str(exc)
    real = os.path.realpath(name)
    if os.path.exists(real):
        if not os.path.isfile(real):
            return None if os.access(real, os.W_OK) else "permission denied"
        if os.access(real, os.W_OK):
            return None
        return "permission denied"
    parent = os.path.dirname(os.path.abspath(real)) or "."
    while not os.path.exists(parent):  # makedirs will create the rest
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"permission denied: cannot create files in {parent}"
    return None


def remove_stale_temps(target: str) -> int:
    """Remove temp files of ``target`` (``.NAME.*.tmp``) older than ``STALE_TEMP_S``,
    left by a writer that was killed between creating and renaming them. Returns how
    many were removed; never raises."""
    directory = os.path.dirname(os.path.abspath(target)) or "."
    prefix = f".{os.path.basename(target)}."
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    now = time.time()
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        full = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_TEMP_S:
                os.unlink(full)
                removed += 1
    return removed


def _checked_target(target: str) -> str:
    if target.endswith(("/", os.sep)):
        raise IsADirectoryError(errno.EISDIR, "is a directory (the path ends in '/')", target)
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, "is a directory", target)
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace(target: str, data: bytes, *, mode: int | None) -> None:
    directory = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def _write_through(target: str, data: bytes) -> None:
    # O_NONBLOCK so that a FIFO nobody reads is an error (ENXIO), not a hang.
    fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.set_blocking(fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _write_in_place(target: str, data: bytes) -> None:
    with open(target, "r+b") as f:
        f.truncate(0)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(directory: str) -> None:
    """fsync a directory so a rename in it survives a crash (best effort off POSIX)."""
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def default_cache_root() -> str:
    """``$WARMPLAN_CACHE_ROOT`` when set, else ``~/.cache/warmplan``, with ``~`` and
    ``$VARIABLES`` expanded, made absolute: the one default for every cache warmplan
    keeps. A variable that is not set is a ``UserError``, not a directory named after
    it."""
    raw = os.environ.get(CACHE_ROOT_ENV) or os.path.join("~", ".cache", "warmplan")
    try:
        return expand_root(raw, f"${CACHE_ROOT_ENV}")
    except ValueError as exc:
        raise UserError(str(exc)) from None


def expand_root(raw: str, source: str) -> str:
    """``raw`` with ``~`` and ``$VARIABLES`` expanded, absolute; ``ValueError`` naming
    ``source`` when a variable is unset or a NUL is present."""
    if "\0" in raw:
        raise ValueError(f"{source}: expected a directory path, found a NUL character in {raw!r}")
    expanded = os.path.expandvars(os.path.expanduser(raw))
    if "$" in expanded:
        raise ValueError(
            f"{source}: {raw!r} names an environment variable that is not set ({expanded!r} after expansion)"
        )
    return os.path.abspath(expanded)


def foreign_owner(path: str | os.PathLike[str]) -> str | None:
    """Why a file that decides what warmplan does (a plan named by an environment
    variable, read in every process) should not be trusted, or ``None``: owned by a
    user other than this process's or root, or writable by group or others. A link
    is judged by the file it names and by the link itself."""
    name = os.fspath(path)
    try:
        targets = [os.lstat(name), os.stat(name)]
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    for st in targets:
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (os.geteuid(), 0):
                return f"a symbolic link owned by uid {st.st_uid}, neither this user ({os.geteuid()}) nor root"
            continue
        if st.st_uid not in (os.geteuid(), 0):
            return f"owned by uid {st.st_uid}, neither this user ({os.geteuid()}) nor root"
        if st.st_mode & 0o022:
            return f"writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None
