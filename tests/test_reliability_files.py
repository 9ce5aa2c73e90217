"""Reliability: files warmplan writes and reads. Special files and links are written
through or replaced as documented (probe S1), the umask is honoured (M3), stale temp
files are swept, and cache files that cannot be used are misses, never hangs or
tracebacks (D1)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from warmplan import fsutil
from warmplan.autotune.cache import (
    MAX_CACHE_BYTES,
    CacheHit,
    CacheMiss,
    atomic_write,
    encode_cache,
    read_cache,
)
from warmplan.errors import UserError

META = {"backend": "builtin"}


def test_report_to_a_fifo_is_written_through(tmp_path: Path) -> None:
    """A FIFO at the report path (like /dev/stdout on a pipe) receives the bytes and stays a FIFO."""
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    time.sleep(0.05)
    fsutil.atomic_write(fifo, b"report\n")
    reader.join(5)
    assert got == [b"report\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_report_to_a_fifo_nobody_reads_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """A FIFO without a reader fails at once (ENXIO) instead of blocking forever."""
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="No such device or address"):
        fsutil.atomic_write(fifo, b"x")


def test_report_to_dev_null_keeps_dev_null() -> None:
    """--report /dev/null (probe S1) writes through: /dev/null stays a character device."""
    fsutil.atomic_write("/dev/null", b"{}\n")
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_report_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    """A link at the report path is followed: its target is replaced, the link kept."""
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    fsutil.atomic_write(tmp_path / "link.json", b"new")
    assert os.path.islink(tmp_path / "link.json")
    assert (tmp_path / "real.json").read_text() == "new"


@pytest.mark.parametrize("suffix", ["", "/"])
def test_report_path_that_is_a_directory_is_refused_before_work(
    tmp_path: Path, suffix: str
) -> None:
    """A directory or a trailing slash (probe D5) is refused by the pre-run check."""
    (tmp_path / "d").mkdir()
    assert fsutil.check_writable(f"{tmp_path}/d{suffix}") in (
        "is a directory",
        "is a directory (the path ends in '/')",
    )
    assert fsutil.check_writable(f"{tmp_path}/new/report.json") is None


def _as_unprivileged(body: Callable[[], object]) -> object:
    """``body()`` as this user, or, as root (whom permissions never stop), in a forked
    child that has become ``nobody`` (uid/gid 65534): its repr comes back."""
    if os.geteuid() != 0:
        return body()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run, report, exit without cleanup
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(65534)
            out = repr(body())
        except BaseException as exc:  # reported to the parent, which fails the test
            out = f"raised {exc!r}"
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return ast.literal_eval(b"".join(chunks).decode()) if chunks else None


def test_report_in_a_read_only_directory_is_refused_before_work() -> None:
    """A directory the user cannot write (probe D5) is named by the pre-run check (as
    root, checked as the unprivileged user nobody, whom the mode does stop)."""
    top = Path(tempfile.mkdtemp(prefix="warmplan-ro-"))
    try:
        top.chmod(0o755)
        ro = top / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert _as_unprivileged(lambda: fsutil.check_writable(ro / "r.json")) == (
            f"permission denied: cannot create files in {ro}"
        )
    finally:
        shutil.rmtree(top)


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    """Under umask 077 reports and cache files are 0600 (probe M3), not 0644."""
    old = os.umask(0o077)
    try:
        fsutil.atomic_write(tmp_path / "r.json", b"{}")
        atomic_write(str(tmp_path / "c.json"), b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "c.json").st_mode) == 0o600


def test_cache_write_replaces_a_planted_symlink(tmp_path: Path) -> None:
    """A link planted at a cache file's name is replaced, never followed out of the root."""
    outside = tmp_path / "outside.txt"
    outside.write_text("theirs")
    (tmp_path / "c.json").symlink_to(outside)
    atomic_write(str(tmp_path / "c.json"), b"ours")
    assert outside.read_text() == "theirs"
    assert not os.path.islink(tmp_path / "c.json")
    assert (tmp_path / "c.json").read_bytes() == b"ours"


def test_stale_temp_files_are_swept_and_fresh_ones_kept(tmp_path: Path) -> None:
    """A killed writer's temp file (older than STALE_TEMP_S) is removed by the next
    write; a fresh one (a concurrent writer's) is left alone."""
    stale = tmp_path / ".c.json.abc123.tmp"
    fresh = tmp_path / ".c.json.def456.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - fsutil.STALE_TEMP_S - 5
    os.utime(stale, (old, old))
    atomic_write(str(tmp_path / "c.json"), b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.json.def456.tmp", "c.json"]


def _miss(path: Path) -> str:
    read = read_cache(str(path), META)
    assert isinstance(read, CacheMiss) and read.exists
    return read.reason


def test_deeply_nested_cache_file_is_a_miss(tmp_path: Path) -> None:
    """A cache file of 200000 nested lists (probe D1) is a miss, not a RecursionError."""
    f = tmp_path / "c.json"
    f.write_text("[" * 200000 + "]" * 200000)
    assert _miss(f) == f"cache file {f} does not parse (corrupt or truncated): nested too deeply"


def test_cache_file_with_a_huge_integer_is_a_miss(tmp_path: Path) -> None:
    """A 5000-digit integer (probe D1) is a miss, not a ValueError."""
    f = tmp_path / "c.json"
    f.write_text('{"x": ' + "9" * 5000 + "}")
    assert _miss(f).startswith(
        f"cache file {f} does not parse (corrupt or truncated): Exceeds the limit"
    )


def test_fifo_at_the_cache_path_is_a_miss_not_a_hang(tmp_path: Path) -> None:
    """A FIFO at the cache path (probe D1) is a miss at once."""
    f = tmp_path / "c.json"
    os.mkfifo(f)
    started = time.perf_counter()
    assert _miss(f) == f"cache file {f} is not a regular file"
    assert time.perf_counter() - started < 1


def test_link_to_dev_zero_is_a_miss(tmp_path: Path) -> None:
    """A link to /dev/zero (probe D1) is a miss, not a read until memory runs out."""
    f = tmp_path / "c.json"
    f.symlink_to("/dev/zero")
    assert _miss(f) == f"cache file {f} is not a regular file"


def test_oversized_cache_file_is_a_miss(tmp_path: Path) -> None:
    """A file larger than MAX_CACHE_BYTES is not read."""
    f = tmp_path / "c.json"
    with open(f, "wb") as out:
        out.truncate(MAX_CACHE_BYTES + 1)
    assert (
        _miss(f) == f"cache file {f} holds {MAX_CACHE_BYTES + 1} bytes, more than {MAX_CACHE_BYTES}"
    )


def test_directory_at_the_cache_path_is_a_miss(tmp_path: Path) -> None:
    """A directory where the cache file should be is a miss naming it."""
    f = tmp_path / "c.json"
    f.mkdir()
    assert _miss(f) == f"cache file {f} is not a regular file"


def test_good_cache_file_still_loads(tmp_path: Path) -> None:
    """The hardened reader still loads a valid file."""
    f = tmp_path / "c.json"
    f.write_bytes(encode_cache(META, b"payload"))
    read = read_cache(str(f), META)
    assert isinstance(read, CacheHit) and read.payload == b"payload"
    assert json.loads(f.read_bytes())["payload_size"] == 7


def test_cache_root_expands_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """WARMPLAN_CACHE_ROOT='$HOME/c' (probe M4) expands $HOME, not a directory named '$HOME'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WARMPLAN_CACHE_ROOT", "$HOME/c")
    assert fsutil.default_cache_root() == f"{tmp_path}/c"


def test_cache_root_with_an_unset_variable_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset variable in the cache root is an error naming the setting."""
    monkeypatch.delenv("WARMPLAN_NO_SUCH_VAR", raising=False)
    monkeypatch.setenv("WARMPLAN_CACHE_ROOT", "$WARMPLAN_NO_SUCH_VAR/c")
    with pytest.raises(UserError) as info:
        fsutil.default_cache_root()
    assert str(info.value) == (
        "$WARMPLAN_CACHE_ROOT: '$WARMPLAN_NO_SUCH_VAR/c' names an environment variable that is "
        "not set ('$WARMPLAN_NO_SUCH_VAR/c' after expansion)"
    )
