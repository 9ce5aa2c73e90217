"""Move compiled artefacts between ranks: safe tarballs and an all-gather of them.

Two users. ``warmplan.compile_cache`` (rank 0 compiles, the others unpack its
caches) uses ``pack``/``unpack``. A ``compile_keys`` step split across ranks
(``split: auto``) uses ``exchange_artefacts``: each rank compiles its share of the
keys, then every rank gets the files the others wrote, so the rest of the keys load
from disk instead of compiling.

``exchange_artefacts(world, dirs, since=snapshot(dirs))``, every rank in the same
order:

1. each rank lists the files under ``dirs`` that are new or changed since its
   ``snapshot`` (taken before it compiled), by path relative to each directory,
   keyed by the directory's role (its index in ``dirs``, or its name), never by
   the absolute path, so ranks whose cache roots differ still match up;
2. the lists are all-gathered; each rank asks for the files it lacks (absent, or of
   another size). Ranks on one host that share a cache root find every file already
   there and ask for nothing: the exchange then moves no bytes;
3. the requests are all-gathered; each rank with something asked of it packs those
   files (once, for all who asked) and broadcasts the pack; the ranks that asked
   unpack their files from it (checked members, temp name and rename);
4. a last all-gather of each rank's status: a failure anywhere (a rank whose own
   compile failed, a pack or an unpack that failed) fails every rank with the same
   message naming the rank, instead of leaving the others waiting.

The world's collectives move the bytes (``broadcast_bytes``, ``all_gather_str``);
every call takes ``timeout_s``, so a hung or dead peer is a ``WorldError`` naming it
(``collective_failure``), never a hang. This module never imports torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
import tarfile
import tempfile
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from warmplan.errors import WarmplanError
from warmplan.world import World, WorldError

# Per rank and per pack: the directories are per user and host, not per model
# (/tmp/torchinductor_$USER by default), so they can hold gigabytes of other work;
# every rank holds a pack in memory a few times over.
MAX_SHARE_BYTES = 512 * 1024 * 1024
MAX_FILE_BYTES = 64 * 1024 * 1024

_OK = b"O"
_ERR = b"E"

# role -> relative path -> (size, mtime_ns)
Snapshot = dict[str, dict[str, tuple[int, int]]]
ArtefactDirs = Sequence[str] | Mapping[str, str]


class UnsafeArchive(WarmplanError):
    """A compile-cache archive member would escape its directory or is not a file."""


class ExchangeError(WorldError):
    """The artefact exchange failed on some rank; every rank raises the same message."""


# --------------------------------------------------------------------------- files


def _skip(name: str) -> bool:
    """Names a cache holds only while a writer is busy: temp files and locks."""
    return name.endswith((".tmp", ".lock")) or name.startswith(".wp.")


def _walk(root: str) -> list[tuple[str, str, os.stat_result]]:
    """(relative path, full path, stat) of each regular file under ``root``, sorted."""
    out: list[tuple[str, str, os.stat_result]] = []
    if not os.path.isdir(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if _skip(name):
                continue
            full = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):  # a file removed while we walk
                st = os.lstat(full)
                if stat.S_ISREG(st.st_mode):
                    out.append((os.path.relpath(full, root).replace(os.sep, "/"), full, st))
    return out


def pack_files(members: Sequence[tuple[str, str]]) -> bytes:
    """An uncompressed tarball (in memory) of ``(arcname, full path)``; a file removed
    since it was listed is left out."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for arcname, full in sorted(members):
            with contextlib.suppress(OSError):
                tar.add(full, arcname=arcname, recursive=False)
    return buf.getvalue()


def pack(
    dirs: Mapping[str, str],
    *,
    max_bytes: int = MAX_SHARE_BYTES,
    max_file_bytes: int = MAX_FILE_BYTES,
    skipped: list[str] | None = None,
) -> bytes:
    """A tarball (uncompressed, in memory) of regular files under ``dirs`` (archive
    prefix -> directory): none larger than ``max_file_bytes``, the newest first until
    ``max_bytes``; the paths left out are appended to ``skipped``."""
    found: list[tuple[float, int, str, str]] = []
    for prefix, root in sorted(dirs.items()):
        for rel, full, st in _walk(root):
            found.append((st.st_mtime, st.st_size, full, f"{prefix}/{rel}"))
    chosen: list[tuple[str, str]] = []
    total = 0
    for _, size, full, arcname in sorted(found, key=lambda f: -f[0]):
        if size > max_file_bytes or total + size > max_bytes:
            if skipped is not None:
                skipped.append(full)
            continue
        total += size
        chosen.append((arcname, full))
    return pack_files(chosen)


def unpack(data: bytes, dirs: Mapping[str, str], *, only: Collection[str] | None = None) -> int:
    """Unpack ``data`` into ``dirs`` (archive prefix -> directory); returns the number
    of files written. ``only``: the member names to write (others are checked, not
    written).

    Every member is checked before anything is written: it must be a regular file or
    directory, under a known prefix, with a relative path free of ``..``. Each file is
    written to a temp name and renamed into place, so a concurrent reader never sees
    half a file.
    """
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        plan: list[tuple[tarfile.TarInfo, str]] = []
        for m in members:
            name = m.name
            parts = name.replace("\\", "/").split("/")
            if name.startswith("/") or os.path.isabs(name) or ".." in parts:
                raise UnsafeArchive(f"compile-cache archive member {name!r} escapes its directory")
            if not (m.isfile() or m.isdir()):
                raise UnsafeArchive(f"compile-cache archive member {name!r} is not a regular file")
            prefix, rest = parts[0], "/".join(parts[1:])
            if prefix not in dirs or not rest:
                raise UnsafeArchive(
                    f"compile-cache archive member {name!r} is outside the shared caches"
                )
            root = os.path.realpath(dirs[prefix])
            target = os.path.realpath(os.path.join(root, rest))
            if not target.startswith(root + os.sep):
                raise UnsafeArchive(f"compile-cache archive member {name!r} escapes {root}")
            if m.isfile() and (only is None or name in only):
                plan.append((m, target))
        for m, target in plan:
            src = tar.extractfile(m)
            if src is None:
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".wp.", suffix=".tmp", dir=os.path.dirname(target))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(src.read())
                os.chmod(tmp, 0o666 & ~_umask())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    return len(plan)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- the exchange


def roles(dirs: ArtefactDirs) -> dict[str, str]:
    """Role -> directory: a sequence's directories by index (``"0"``, ``"1"``, ...),
    a mapping as given."""
    if isinstance(dirs, Mapping):
        return {str(k): str(v) for k, v in dirs.items()}
    return {str(i): str(d) for i, d in enumerate(dirs)}


def snapshot(dirs: ArtefactDirs) -> Snapshot:
    """Each file under ``dirs`` now, by role and relative path: (size, mtime_ns)."""
    return {
        role: {rel: (st.st_size, st.st_mtime_ns) for rel, _, st in _walk(root)}
        for role, root in roles(dirs).items()
    }


def new_files(dirs: ArtefactDirs, since: Snapshot | None) -> dict[str, dict[str, int]]:
    """Files under ``dirs`` that are new or changed since ``since`` (``None``: every
    file), by role and relative path: size. Files over ``MAX_FILE_BYTES`` are left out."""
    out: dict[str, dict[str, int]] = {}
    for role, root in roles(dirs).items():
        before = (since or {}).get(role, {})
        out[role] = {
            rel: st.st_size
            for rel, _, st in _walk(root)
            if before.get(rel) != (st.st_size, st.st_mtime_ns) and st.st_size <= MAX_FILE_BYTES
        }
    return out


def _present(root: str, rel: str, size: int) -> bool:
    try:
        st = os.lstat(os.path.join(root, rel))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _failures(statuses: Sequence[Mapping[str, Any]], stage: str) -> None:
    bad = [(r, s["error"]) for r, s in enumerate(statuses) if s.get("error")]
    if bad:
        text = "; ".join(f"rank {r} failed {stage}: {e}" for r, e in bad)
        raise ExchangeError(f"compile-key exchange: {text}")


def _gather(world: World, value: Any, what: str, timeout_s: float) -> list[Any]:
    try:
        raw = world.all_gather_str(json.dumps(value), timeout_s=timeout_s)
    except WorldError as exc:
        raise ExchangeError(f"compile-key exchange ({what}): {exc}") from exc
    return [json.loads(v) for v in raw]


def exchange_artefacts(
    world: World,
    dirs: ArtefactDirs,
    *,
    since: Snapshot | None = None,
    error: str | None = None,
    timeout_s: float,
    max_bytes: int = MAX_SHARE_BYTES,
) -> dict[str, Any]:
    """Give every rank the files the others wrote under ``dirs`` since ``since``
    (see the module's docstring). ``error``: this rank failed before the exchange
    (its own compile); every rank then raises ``ExchangeError`` naming it.

    Returns what moved: ``bytes`` (all packs broadcast, the same on every rank),
    ``bytes_sent`` and ``files_sent`` by this rank, ``bytes_received`` (packs this
    rank unpacked from), ``files_received``, ``files_present`` (offered by a peer,
    already here: a shared cache root) and ``shared`` (every directory is the same
    one, on the same host, on every rank)."""
    mine = roles(dirs)
    rank, n = world.rank, world.world_size
    listed: dict[str, dict[str, int]] = {}
    if error is None:
        try:
            listed = new_files(mine, since)
        except OSError as exc:
            error = f"listing its artefacts: {exc}"
    host = socket.gethostname()
    real = {role: os.path.realpath(d) for role, d in mine.items()}
    heads = _gather(
        world,
        {"error": error, "roles": sorted(mine), "host": host, "real": real, "files": listed},
        "listing",
        timeout_s,
    )
    _failures(heads, "before the exchange")
    for r, head in enumerate(heads):
        if head["roles"] != sorted(mine):
            raise ExchangeError(
                f"compile-key exchange: rank {r} has artefact directories "
                f"{head['roles']}, rank 0 has {heads[0]['roles']}"
            )
    shared = all(h["host"] == host and h["real"] == real for h in heads)

    # What this rank lacks, each file from the lowest rank that offers it. Ranks that
    # share every directory ask for nothing: a peer's files are in this rank's own
    # directories already (its compile finished before the listing), and a size check
    # would race a cache that rewrites a file in place (an index, a group manifest),
    # asking a peer to pack the very file this rank reads.
    wanted: dict[int, list[str]] = {}
    present = 0
    seen: set[str] = set()
    for r, head in enumerate(heads):
        if r == rank:
            continue
        for role, files in sorted(head["files"].items()):
            for rel, size in sorted(files.items()):
                arc = f"{role}/{rel}"
                if arc in seen:
                    continue
                seen.add(arc)
                if shared or _present(mine[role], rel, int(size)):
                    present += 1
                else:
                    wanted.setdefault(r, []).append(arc)
    asks = _gather(world, {str(r): v for r, v in wanted.items()}, "requests", timeout_s)

    out = {
        "bytes": 0,
        "bytes_sent": 0,
        "files_sent": 0,
        "bytes_received": 0,
        "files_received": 0,
        "files_present": present,
        "shared": shared,
    }
    failure: str | None = None
    for src in range(n):
        asked = sorted({a for r in range(n) if r != src for a in asks[r].get(str(src), [])})
        if not asked:
            continue
        payload: bytes | None = None
        if src == rank:
            try:
                members = []
                total = 0
                for arc in asked:
                    role, rel = arc.split("/", 1)
                    full = os.path.join(mine[role], rel)
                    size = os.path.getsize(full) if os.path.isfile(full) else 0
                    if total + size > max_bytes:
                        continue
                    total += size
                    members.append((arc, full))
                payload = _OK + pack_files(members)
                out["files_sent"] = len(members)
            except Exception as exc:  # told to every rank, not raised alone
                payload = _ERR + f"packing its artefacts: {exc}".encode("utf-8", "replace")
        try:
            msg = world.broadcast_bytes(payload, src=src, timeout_s=timeout_s)
        except WorldError as exc:
            raise ExchangeError(f"compile-key exchange (rank {src}'s artefacts): {exc}") from exc
        msg = msg or b""
        out["bytes"] += len(msg)
        if src == rank:
            out["bytes_sent"] = len(msg)
            if msg[:1] == _ERR:
                failure = msg[1:].decode("utf-8", "replace")
            continue
        mine_asked = set(wanted.get(src, []))
        if not mine_asked or msg[:1] != _OK or failure is not None:
            continue
        try:
            out["files_received"] += unpack(msg[1:], mine, only=mine_asked)
            out["bytes_received"] += len(msg)
        except (tarfile.TarError, UnsafeArchive, OSError) as exc:
            failure = f"unpacking rank {src}'s artefacts: {exc}"
    statuses = _gather(world, {"error": failure}, "status", timeout_s)
    _failures(statuses, "in the exchange")
    return out
