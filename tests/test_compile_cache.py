"""Compile-cache sharing: packing, safe unpacking, the single-process path."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import structlog

from warmplan.compile_cache import UnsafeArchive, cache_dirs, pack, share_compile_caches, unpack
from warmplan.world import LocalWorld


def test_pack_unpack_round_trip(tmp_path: Path) -> None:
    """Files under the inductor and triton dirs arrive at the same relative paths."""
    src = {"inductor": tmp_path / "i", "triton": tmp_path / "t"}
    (src["inductor"] / "fx" / "a").mkdir(parents=True)
    (src["inductor"] / "fx" / "a" / "g.py").write_bytes(b"graph")
    (src["triton"] / "k").mkdir(parents=True)
    (src["triton"] / "k" / "kernel.cubin").write_bytes(b"\x7fELF")
    (src["triton"] / "k" / ".half.tmp").write_bytes(b"partial")
    data = pack({k: str(v) for k, v in src.items()})
    dst = {"inductor": tmp_path / "di", "triton": tmp_path / "dt"}
    assert unpack(data, {k: str(v) for k, v in dst.items()}) == 2
    assert (dst["inductor"] / "fx" / "a" / "g.py").read_bytes() == b"graph"
    assert (dst["triton"] / "k" / "kernel.cubin").read_bytes() == b"\x7fELF"
    assert not (dst["triton"] / "k" / ".half.tmp").exists()


def _tar(name: str, *, kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        info.size = 0 if kind != tarfile.REGTYPE else 1
        tar.addfile(info, io.BytesIO(b"x") if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_tar("/etc/passwd"), "escapes its directory"),
        (_tar("inductor/../../evil"), "escapes its directory"),
        (_tar("inductor/link", kind=tarfile.SYMTYPE, link="/etc"), "is not a regular file"),
        (_tar("elsewhere/file"), "is outside the shared caches"),
    ],
)
def test_unsafe_members_are_rejected(tmp_path: Path, data: bytes, message: str) -> None:
    """Absolute paths, '..', links and unknown prefixes are refused before writing."""
    with pytest.raises(UnsafeArchive, match=message):
        unpack(data, {"inductor": str(tmp_path / "i"), "triton": str(tmp_path / "t")})
    assert list(tmp_path.iterdir()) == []


def test_single_process_runs_leader_work_only() -> None:
    """world_size 1: leader_work runs, nothing is packed."""
    ran: list[int] = []
    out = share_compile_caches(
        LocalWorld(), leader_work=lambda: ran.append(1), timeout_s=5, log=structlog.get_logger()
    )
    assert (out.role, out.bytes, ran) == ("single", 0, [1])


def test_cache_dirs_follow_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR and WARMPLAN_CACHE_ROOT (its aot/)
    pick the directories; nesting dedupes."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "ind"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tri"))
    monkeypatch.setenv("WARMPLAN_CACHE_ROOT", str(tmp_path / "wp"))
    assert cache_dirs() == {
        "inductor": str(tmp_path / "ind"),
        "triton": str(tmp_path / "tri"),
        "aot": str(tmp_path / "wp" / "aot"),
    }
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "ind" / "triton"))
    monkeypatch.setenv("WARMPLAN_CACHE_ROOT", str(tmp_path / "ind"))
    assert cache_dirs() == {"inductor": str(tmp_path / "ind")}
