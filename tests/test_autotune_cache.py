"""The autotune cache file: format, validation, atomic writes."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from warmplan.autotune.cache import (
    CacheHit,
    CacheMiss,
    CacheWriteError,
    atomic_write,
    default_cache_root,
    encode_cache,
    fingerprint,
    read_cache,
)

META = {
    "backend": "fake",
    "backend_version": "1",
    "device": "cpu",
    "arch": "cpu",
    "config_hash": "h",
}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_round_trip(tmp_path: Path) -> None:
    """A file written by encode_cache reads back as a hit with the payload's sha256."""
    path = tmp_path / "c.json"
    atomic_write(str(path), encode_cache(META, b"\x00payload\xff"))
    hit = read_cache(str(path), META)
    assert isinstance(hit, CacheHit)
    assert hit.payload == b"\x00payload\xff"
    assert hit.fingerprint == fingerprint(b"\x00payload\xff")
    assert hit.raw == path.read_bytes()


def test_missing_file_is_a_miss(tmp_path: Path) -> None:
    """No file: a miss that says so and does not claim the file exists."""
    miss = read_cache(str(tmp_path / "nope.json"), META)
    assert isinstance(miss, CacheMiss)
    assert not miss.exists
    assert miss.reason == f"no cache file at {tmp_path / 'nope.json'}"


def test_truncated_file_is_a_miss(tmp_path: Path) -> None:
    """A truncated file does not parse and is never loaded."""
    raw = encode_cache(META, b"x" * 1000)
    path = write(tmp_path / "c.json", raw[: len(raw) // 2])
    miss = read_cache(str(path), META)
    assert isinstance(miss, CacheMiss)
    assert miss.exists
    assert "does not parse (corrupt or truncated)" in miss.reason


def test_corrupt_payload_fails_checksum(tmp_path: Path) -> None:
    """A payload changed after writing fails its sha256."""
    doc = json.loads(encode_cache(META, b"good"))
    doc["payload_b64"] = "YmFk"  # "bad"
    path = write(tmp_path / "c.json", json.dumps(doc).encode())
    miss = read_cache(str(path), META)
    assert isinstance(miss, CacheMiss)
    assert miss.reason == f"cache file {path} payload checksum mismatch (corrupt or truncated)"


def test_mismatch_names_keys_and_both_values(tmp_path: Path) -> None:
    """A metadata mismatch names every differing key with the file's and this rank's value."""
    path = write(tmp_path / "c.json", encode_cache({**META, "backend_version": "0.6.5"}, b"p"))
    miss = read_cache(str(path), {**META, "backend_version": "0.7.2", "fake.packages": "cudnn"})
    assert isinstance(miss, CacheMiss)
    assert miss.reason == (
        f"cache file {path} metadata mismatch: backend_version: file has '0.6.5', this rank has "
        "'0.7.2'; fake.packages: file has None, this rank has 'cudnn'"
    )


def test_other_format_version_is_a_miss(tmp_path: Path) -> None:
    """A file from another warmplan cache format version is not loaded."""
    doc = json.loads(encode_cache(META, b"p"))
    doc["warmplan_autotune_cache"] = 99
    path = write(tmp_path / "c.json", json.dumps(doc).encode())
    miss = read_cache(str(path), META)
    assert isinstance(miss, CacheMiss)
    assert "format version 99" in miss.reason


def test_unwritable_dir_names_the_path(tmp_path: Path) -> None:
    """Writing under a read-only directory raises CacheWriteError naming the path."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    target = ro / "sub" / "c.json"
    try:
        if os.access(ro, os.W_OK):  # running as root: simulate with a file in the way
            ro.chmod(0o700)
            (ro / "sub").write_text("not a dir")
        with pytest.raises(CacheWriteError, match=f"cannot write cache file {target}"):
            atomic_write(str(target), b"x")
    finally:
        ro.chmod(0o700)
    assert [p.name for p in ro.iterdir()] in ([], ["sub"])


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename that fails leaves neither the target nor a temp file behind."""

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CacheWriteError, match="No space left on device"):
        atomic_write(str(tmp_path / "c.json"), b"x" * 100)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """WARMPLAN_CACHE_ROOT overrides ~/.cache/warmplan."""
    monkeypatch.delenv("WARMPLAN_CACHE_ROOT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_root() == str(tmp_path / ".cache" / "warmplan")
    monkeypatch.setenv("WARMPLAN_CACHE_ROOT", str(tmp_path / "x"))
    assert default_cache_root() == str(tmp_path / "x")


def _writer(path: str, i: int, rounds: int) -> None:
    payload = bytes([i]) * (200_000 + i)
    for _ in range(rounds):
        atomic_write(path, encode_cache(META, payload))


@pytest.mark.multiproc
def test_eight_writers_never_tear_the_file(tmp_path: Path) -> None:
    """Eight processes writing one path: every read sees one whole file, no temp left."""
    path = str(tmp_path / "c.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, i, 25)) for i in range(8)]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs) or reads == 0:
        got = read_cache(path, META)
        if isinstance(got, CacheHit):
            reads += 1
            assert len(set(got.payload)) == 1
        else:
            assert not got.exists, got.reason
    for p in procs:
        p.join()
        assert p.exitcode == 0
    final = read_cache(path, META)
    assert isinstance(final, CacheHit)
    assert reads > 0
    assert os.listdir(tmp_path) == ["c.json"]
