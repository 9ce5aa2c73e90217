"""Reliability: sharing compile caches sends what a compile cache plausibly holds,
within a bound, not every byte of a shared per-user directory (probe D9)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from warmplan.compile_cache import pack


def _names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getnames()


def test_files_over_the_per_file_bound_are_left_out(tmp_path: Path) -> None:
    """An unrelated 394 MB file (probe D9) is not packed; the kernels are."""
    (tmp_path / "k.so").write_bytes(b"k" * 100)
    with open(tmp_path / "unrelated.bin", "wb") as f:
        f.truncate(1000)
    skipped: list[str] = []
    data = pack({"inductor": str(tmp_path)}, max_file_bytes=500, skipped=skipped)
    assert _names(data) == ["inductor/k.so"]
    assert skipped == [str(tmp_path / "unrelated.bin")]


def test_newest_files_first_within_the_total(tmp_path: Path) -> None:
    """Past the total bound, the oldest files are the ones left out."""
    for i, name in enumerate(["old", "mid", "new"]):
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    skipped: list[str] = []
    data = pack({"triton": str(tmp_path)}, max_bytes=250, skipped=skipped)
    assert _names(data) == ["triton/mid", "triton/new"]
    assert skipped == [str(tmp_path / "old")]


def test_links_and_temp_files_are_never_packed(tmp_path: Path) -> None:
    """A link (to anything) and a writer's temp file stay out of the archive."""
    (tmp_path / "k.so").write_bytes(b"k")
    (tmp_path / "link").symlink_to("/etc/passwd")
    (tmp_path / ".x.tmp").write_bytes(b"t")
    assert _names(pack({"inductor": str(tmp_path)})) == ["inductor/k.so"]
