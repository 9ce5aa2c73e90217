"""The autotune cache file: one JSON document holding metadata, a backend payload
and the payload's sha256.

The file is written atomically (temp file in the same directory, fsync, rename,
fsync of the directory), so a reader sees the old file or the new one, never a torn
one. A file that does not parse, is truncated, fails its checksum or whose metadata
differs from what this rank expects is *missing*: ``read_cache`` says why and the
caller never loads it.

This module never imports torch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from warmplan import fsutil
from warmplan.fsutil import CACHE_ROOT_ENV as CACHE_ROOT_ENV  # re-exported; home: fsutil
from warmplan.fsutil import default_cache_root as default_cache_root

FORMAT_VERSION = 1
FORMAT_KEY = "warmplan_autotune_cache"
# Tuning results are kilobytes to a few megabytes; a larger file is not one of ours.
MAX_CACHE_BYTES = 64 * 1024 * 1024


def fingerprint(payload: bytes) -> str:
    """The sha256 of a tuning payload, as the report and the ranks compare it."""
    return hashlib.sha256(payload).hexdigest()


def encode_cache(metadata: Mapping[str, str], payload: bytes) -> bytes:
    """The bytes of a cache file holding ``payload`` under ``metadata``."""
    doc = {
        FORMAT_KEY: FORMAT_VERSION,
        "metadata": dict(sorted(metadata.items())),
        "payload_sha256": fingerprint(payload),
        "payload_size": len(payload),
        "payload_b64": base64.b64encode(payload).decode("ascii"),
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheHit:
    """A cache file that parsed, matched and passed its checksum."""

    payload: bytes
    fingerprint: str
    raw: bytes  # the file's bytes, as broadcast to other ranks


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheMiss:
    """No usable cache file; ``reason`` says why (missing, corrupt, mismatched)."""

    reason: str
    exists: bool = False


CacheRead = CacheHit | CacheMiss


def metadata_mismatch(expected: Mapping[str, str], found: Mapping[str, str]) -> list[str]:
    """One ``key: file has X, this rank has Y`` line per differing key, sorted."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        want, got = expected.get(key), found.get(key)
        if want != got:
            lines.append(f"{key}: file has {got!r}, this rank has {want!r}")
    return lines


def decode_cache(raw: bytes, expected: Mapping[str, str], *, path: str) -> CacheRead:
    """Validate ``raw`` (a cache file's bytes) against ``expected`` metadata."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and integers past Python's digit
        # limit; RecursionError, nesting deeper than the parser's stack.
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return CacheMiss(
            reason=f"cache file {path} does not parse (corrupt or truncated): {detail}",
            exists=True,
        )
    if not isinstance(doc, dict) or doc.get(FORMAT_KEY) is None:
        return CacheMiss(reason=f"cache file {path} is not a warmplan autotune cache", exists=True)
    if doc[FORMAT_KEY] != FORMAT_VERSION:
        return CacheMiss(
            reason=(
                f"cache file {path} has format version {doc[FORMAT_KEY]!r}, "
                f"this warmplan reads {FORMAT_VERSION}"
            ),
            exists=True,
        )
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return CacheMiss(reason=f"cache file {path} has no valid metadata", exists=True)
    diff = metadata_mismatch(expected, meta)
    if diff:
        return CacheMiss(
            reason=f"cache file {path} metadata mismatch: " + "; ".join(diff), exists=True
        )
    try:
        payload = base64.b64decode(str(doc["payload_b64"]), validate=True)
    except (KeyError, ValueError) as exc:
        return CacheMiss(reason=f"cache file {path} payload does not decode: {exc}", exists=True)
    digest = fingerprint(payload)
    if digest != doc.get("payload_sha256") or len(payload) != doc.get("payload_size"):
        return CacheMiss(
            reason=f"cache file {path} payload checksum mismatch (corrupt or truncated)",
            exists=True,
        )
    return CacheHit(payload=payload, fingerprint=digest, raw=raw)


def read_cache(path: str, expected: Mapping[str, str]) -> CacheRead:
    """Read and validate the cache file at ``path``; never raises, never blocks.

    Only a regular file of at most ``MAX_CACHE_BYTES`` is read: a FIFO (which would
    block in ``open``), a device (``/dev/zero`` reads forever) or a directory at the
    path is a miss, like an unreadable file."""
    raw = read_bytes(path)
    return raw if isinstance(raw, CacheMiss) else decode_cache(raw, expected, path=path)


def read_raw(path: str) -> CacheRead:
    """Read a file that is the payload itself (FlashInfer's own table, as vLLM keeps
    it), as safely as ``read_cache``; what the payload holds is the caller's check."""
    raw = read_bytes(path)
    if isinstance(raw, CacheMiss):
        return raw
    return CacheHit(payload=raw, fingerprint=fingerprint(raw), raw=raw)


def read_bytes(path: str) -> bytes | CacheMiss:
    """The bytes of the regular file at ``path`` (at most ``MAX_CACHE_BYTES``), or a
    miss saying why not; never raises, never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return CacheMiss(reason=f"no cache file at {path}")
    except OSError as exc:
        return CacheMiss(
            reason=f"cache file {path} is unreadable: {exc.strerror or exc}", exists=True
        )
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return CacheMiss(reason=f"cache file {path} is not a regular file", exists=True)
        if st.st_size > MAX_CACHE_BYTES:
            return CacheMiss(
                reason=f"cache file {path} holds {st.st_size} bytes, more than {MAX_CACHE_BYTES}",
                exists=True,
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CACHE_BYTES + 1)
    except OSError as exc:
        return CacheMiss(
            reason=f"cache file {path} is unreadable: {exc.strerror or exc}", exists=True
        )
    finally:
        os.close(fd)
    if len(raw) > MAX_CACHE_BYTES:
        return CacheMiss(reason=f"cache file {path} grew past {MAX_CACHE_BYTES} bytes", exists=True)
    return raw


def file_holds(path: str, data: bytes) -> bool:
    """Whether the file at ``path`` already holds exactly ``data``."""
    try:
        if os.path.getsize(path) != len(data):
            return False
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False


class CacheWriteError(OSError):
    """The cache file could not be written; the message names the path."""


def atomic_write(path: str, data: bytes) -> None:
    """``warmplan.fsutil.replace_file`` (temp file + rename over the name, never
    following a link planted there; stale temp files of killed writers removed), with
    failures as a ``CacheWriteError`` naming the path."""
    try:
        fsutil.replace_file(path, data)
    except OSError as exc:
        raise CacheWriteError(f"cannot write cache file {path}: {exc.strerror or exc}") from exc
