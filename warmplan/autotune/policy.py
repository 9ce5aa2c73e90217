"""Autotune policies: who tunes, who loads, and how the ranks agree.

``leader``
    Rank 0 reads its cache and broadcasts the decision (tune, load, skip or fail)
    *before* any rank enters a run, so a rank-local cache hit never leaves the other
    ranks waiting in a collective (vllm#57423). To tune, rank 0 runs the step's run
    under ``backend.tuning()`` while the others run the same run without it; rank 0
    exports the results and writes the cache file atomically, then broadcasts the
    file's bytes. Local rank 0 of each node writes them where its file does not
    already hold them (another node, another cache root), a barrier follows, every
    rank loads the file it now has and the ranks' fingerprints must agree.
``every_rank``
    Each rank reads, tunes and keeps its own file; the cache path must differ per
    rank on a host (put ``{rank}`` in the path template).
``load_only``
    Never tunes. A missing or mismatched file follows ``on_missing``: ``skip`` (the
    default, with a warning) or ``fail``.

Whether a rank runs its run is always decided collectively, so no rank runs a
forward the others do not (a forward may itself hold collectives).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from warmplan.autotune.cache import (
    FORMAT_VERSION,
    CacheHit,
    CacheWriteError,
    atomic_write,
    decode_cache,
    encode_cache,
    file_holds,
    read_cache,
)
from warmplan.dist import World, WorldError
from warmplan.errors import StepError
from warmplan.workers.base import AutotuneBackend, AutotuneLoadError

POLICIES: tuple[str, ...] = ("leader", "every_rank", "load_only")
ON_MISSING: tuple[str, ...] = ("tune", "skip", "fail")
DEFAULT_TIMEOUT_S = 600.0

Decision = Literal["tune", "load", "skip"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AutotuneOutcome:
    """What an autotune step did on this rank; the executor puts it in the report.

    ``ran_run`` is True when the step ran its run (tuning or after loading), so the
    step it replaces is covered; ``fingerprint`` is the sha256 of the results loaded.
    """

    decision: Decision
    ran_run: bool
    cache_path: str | None
    fingerprint: str | None
    reason: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TuneContext:
    """Everything a policy needs; built by ``warmplan.steps.autotune.run_autotune``."""

    step_id: str
    backend: AutotuneBackend
    world: World
    path: str
    metadata: Mapping[str, str]
    timeout_s: float
    on_missing: str
    run: Callable[[], None]
    log: Any

    @property
    def rank(self) -> int:
        return self.world.rank

    def fail(self, message: str) -> StepError:
        return StepError(self.step_id, message, rank=self.rank)


def expected_metadata(
    *,
    backend: AutotuneBackend,
    device: str,
    arch: str,
    config_hash: str | None,
) -> dict[str, str]:
    """What a cache file must carry to be loadable on this rank."""
    meta = {
        "warmplan_format": str(FORMAT_VERSION),
        "backend": backend.name,
        "backend_version": backend.version,
        "device": device,
        "arch": arch,
        "config_hash": config_hash or "",
    }
    for key, value in backend.metadata().items():
        meta[f"{backend.name}.{key}"] = str(value)
    return meta


# -- collectives that report as step errors ---------------------------------------------


def _bcast(ctx: TuneContext, data: bytes | None, what: str) -> bytes | None:
    try:
        return ctx.world.broadcast_bytes(data, src=0, timeout_s=ctx.timeout_s)
    except WorldError as exc:
        raise ctx.fail(f"{what}: {exc}") from exc


def _gather(ctx: TuneContext, value: str, what: str) -> list[str]:
    try:
        return ctx.world.all_gather_str(value, timeout_s=ctx.timeout_s)
    except WorldError as exc:
        raise ctx.fail(f"{what}: {exc}") from exc


def _barrier(ctx: TuneContext, what: str) -> None:
    try:
        ctx.world.barrier(timeout_s=ctx.timeout_s)
    except WorldError as exc:
        raise ctx.fail(f"{what}: {exc}") from exc


def _pack(kind: str, reason: str | None = None, body: bytes = b"") -> bytes:
    return json.dumps({"kind": kind, "reason": reason}).encode() + b"\n" + body


def _unpack(msg: bytes | None) -> tuple[str, str | None, bytes]:
    if not msg:
        return "error", "rank 0 sent nothing", b""
    head, _, body = msg.partition(b"\n")
    doc = json.loads(head)
    return str(doc["kind"]), doc.get("reason"), body


def _skip_or_fail(ctx: TuneContext, missing: list[int], statuses: list[str], skip_reason: str) -> AutotuneOutcome:
    """Ranks ``missing`` have no usable cache and will not tune: fail (on_missing=fail)
    or skip, every rank alike; ``skip_reason`` is formatted with ``ranks``, ``reasons``."""
    reasons = "; ".join(f"rank {r}: {statuses[r].removeprefix('miss: ')}" for r in missing)
    if ctx.on_missing == "fail":
        raise ctx.fail(f"no usable autotune cache on {_ranks(missing)} and on_missing=fail: {reasons}")
    ctx.log.warning("autotune.skipped", step=ctx.step_id, reason=reasons)
    return AutotuneOutcome(
        decision="skip",
        ran_run=False,
        cache_path=ctx.path,
        fingerprint=None,
        reason=skip_reason.format(ranks=_ranks(missing), reasons=reasons),
    )


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _check_statuses(ctx: TuneContext, statuses: list[str], what: str) -> None:
    """Raise on this rank if any rank reported ``error: ...`` in ``statuses``."""
    errors = [
        (r, s.removeprefix("error: ")) for r, s in enumerate(statuses) if s.startswith("error: ")
    ]
    if errors:
        detail = "; ".join(f"rank {r}: {m}" for r, m in errors)
        raise ctx.fail(f"{what} failed on {_ranks([r for r, _ in errors])}: {detail}")


def _load_hit(ctx: TuneContext, hit: CacheHit) -> str:
    """Install ``hit`` in the backend; return ``fingerprint`` or ``error: ...``."""
    try:
        ctx.backend.load(hit.payload)
    except AutotuneLoadError as exc:
        return f"error: backend {ctx.backend.name!r} refused {ctx.path}: {exc}"
    except Exception as exc:
        return f"error: loading {ctx.path} raised {type(exc).__name__}: {exc}"
    return hit.fingerprint


def _run_captured(ctx: TuneContext) -> str | None:
    try:
        ctx.run()
    except Exception as exc:
        return f"the run raised {type(exc).__name__}: {exc}"
    return None


# -- leader ---------------------------------------------------------------------------


def run_leader(ctx: TuneContext) -> AutotuneOutcome:
    """Rank 0 decides and tunes; every rank ends with the same loaded results."""
    rank = ctx.rank
    msg: bytes | None = None
    if rank == 0:
        read = read_cache(ctx.path, ctx.metadata)
        if isinstance(read, CacheHit):
            msg = _pack("load", None, read.raw)
        else:
            if read.exists:
                ctx.log.warning("autotune.cache_unusable", step=ctx.step_id, reason=read.reason)
            kind = {"tune": "tune", "skip": "skip", "fail": "fail"}[ctx.on_missing]
            msg = _pack(kind, read.reason)
    kind, reason, body = _unpack(_bcast(ctx, msg, "waiting for rank 0's tune-or-load decision"))
    ctx.log.info("autotune.decision", step=ctx.step_id, rank=rank, decision=kind, reason=reason)

    if kind == "skip":
        ctx.log.warning("autotune.skipped", step=ctx.step_id, reason=reason)
        return AutotuneOutcome(
            decision="skip",
            ran_run=False,
            cache_path=ctx.path,
            fingerprint=None,
            reason=f"rank 0: {reason}; on_missing=skip",
        )
    if kind == "fail":
        raise ctx.fail(f"no usable autotune cache on rank 0 and on_missing=fail: {reason}")

    run_error: str | None = None
    if kind == "tune":
        if rank == 0:
            result, leader_error = _leader_tune(ctx)
            _bcast(ctx, result, "sending the tuned cache")
            if leader_error is not None:
                raise leader_error
        else:
            run_error = _run_captured(ctx)
            result = _bcast(ctx, None, "waiting for rank 0 to finish tuning") or b""

        rkind, rreason, body = _unpack(result)
        if rkind == "error":
            raise ctx.fail(f"rank 0 failed while tuning: {rreason}")
        if rkind == "empty":
            ctx.log.warning("autotune.no_results", step=ctx.step_id, reason=rreason)
            statuses = _gather(ctx, f"error: {run_error}" if run_error else "ok", "after tuning")
            _check_statuses(ctx, statuses, "the tuning run")
            return AutotuneOutcome(
                decision="tune", ran_run=True, cache_path=ctx.path, fingerprint=None, reason=rreason
            )

    raw = body
    status = f"error: {run_error}" if run_error else _place_file(ctx, raw, local_leader=True)
    _barrier(ctx, "waiting for every rank to hold the cache file")
    if status == "ok":
        status = _place_file(ctx, raw, local_leader=False)
    if status == "ok":
        read = read_cache(ctx.path, ctx.metadata)
        status = _load_hit(ctx, read) if isinstance(read, CacheHit) else f"error: {read.reason}"
    statuses = _gather(ctx, status, "comparing loaded fingerprints")
    _check_statuses(ctx, statuses, "loading the autotune cache")
    differ = [r for r, fp in enumerate(statuses) if fp != statuses[0]]
    if differ:
        detail = ", ".join(f"rank {r}: {statuses[r][:16]}" for r in differ)
        raise ctx.fail(
            f"ranks loaded different tuning results: rank 0 has {statuses[0][:16]}, {detail}"
        )
    if kind == "load":
        ctx.run()
    ctx.log.info(
        "autotune.loaded", step=ctx.step_id, rank=rank, path=ctx.path, fingerprint=statuses[0]
    )
    return AutotuneOutcome(
        decision="tune" if kind == "tune" else "load",
        ran_run=True,
        cache_path=ctx.path,
        fingerprint=statuses[rank],
        reason=reason if kind == "tune" else None,
    )


def _leader_tune(ctx: TuneContext) -> tuple[bytes, StepError | None]:
    """On rank 0: tune, export, write the file. Returns the message for the others."""
    try:
        with ctx.backend.tuning():
            ctx.run()
        payload = ctx.backend.export()
    except Exception as exc:
        err = ctx.fail(f"tuning raised {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return _pack("error", f"{type(exc).__name__}: {exc}"), err
    if not payload:
        return _pack("empty", "tuning produced no results; default tactics stay in use"), None
    raw = encode_cache(ctx.metadata, payload)
    try:
        atomic_write(ctx.path, raw)
    except CacheWriteError as exc:
        return _pack("error", str(exc)), ctx.fail(str(exc))
    ctx.log.info("autotune.written", step=ctx.step_id, path=ctx.path, bytes=len(raw))
    return _pack("ok", None, raw), None


def _place_file(ctx: TuneContext, raw: bytes, *, local_leader: bool) -> str:
    """Make this rank's cache path hold ``raw``; ``ok`` or ``error: ...``.

    Before the barrier only local rank 0 of each node writes (rank 0 already has);
    after it, a rank whose path is still not right (a per-rank path) writes its own.
    """
    if ctx.rank == 0 or file_holds(ctx.path, raw):
        return "ok"
    if local_leader and ctx.world.local_rank != 0:
        return "ok"
    try:
        atomic_write(ctx.path, raw)
    except CacheWriteError as exc:
        return f"error: {exc}"
    return "ok"


# -- every_rank -------------------------------------------------------------------------


def run_every_rank(ctx: TuneContext) -> AutotuneOutcome:
    """Each rank tunes or loads its own file; ranks agree only on whether to run."""
    places = _gather(ctx, f"{socket.gethostname()}\t{ctx.path}", "comparing cache paths")
    seen: dict[str, int] = {}
    for r, place in enumerate(places):
        if place in seen:
            raise ctx.fail(
                f"policy every_rank needs a cache path per rank, but ranks {seen[place]} and {r} "
                f"share {place.split(chr(9), 1)[1]} on one host; put {{rank}} in the cache path template"
            )
        seen[place] = r
    read = read_cache(ctx.path, ctx.metadata)
    statuses = _gather(
        ctx, "hit" if isinstance(read, CacheHit) else f"miss: {read.reason}", "comparing caches"
    )
    missing = [r for r, s in enumerate(statuses) if s != "hit"]
    if missing and ctx.on_missing != "tune":
        return _skip_or_fail(ctx, missing, statuses, "{ranks} without a usable cache ({reasons}); on_missing=skip")
    if isinstance(read, CacheHit):
        status = _load_hit(ctx, read)
        if status.startswith("error: "):
            raise ctx.fail(status.removeprefix("error: "))
        ctx.run()
        return AutotuneOutcome(
            decision="load", ran_run=True, cache_path=ctx.path, fingerprint=status, reason=None
        )
    ctx.log.info(
        "autotune.decision", step=ctx.step_id, rank=ctx.rank, decision="tune", reason=read.reason
    )
    with ctx.backend.tuning():
        ctx.run()
    payload = ctx.backend.export()
    if not payload:
        return AutotuneOutcome(
            decision="tune",
            ran_run=True,
            cache_path=ctx.path,
            fingerprint=None,
            reason="tuning produced no results; default tactics stay in use",
        )
    raw = encode_cache(ctx.metadata, payload)
    try:
        atomic_write(ctx.path, raw)
    except CacheWriteError as exc:
        raise ctx.fail(str(exc)) from exc
    hit = decode_cache(raw, ctx.metadata, path=ctx.path)
    assert isinstance(hit, CacheHit)
    status = _load_hit(ctx, hit)
    if status.startswith("error: "):
        raise ctx.fail(status.removeprefix("error: "))
    return AutotuneOutcome(
        decision="tune", ran_run=True, cache_path=ctx.path, fingerprint=status, reason=read.reason
    )


# -- load_only ------------------------------------------------------------------------


def run_load_only(ctx: TuneContext) -> AutotuneOutcome:
    """Every rank loads its file; if any rank cannot, all skip (or all fail)."""
    read = read_cache(ctx.path, ctx.metadata)
    statuses = _gather(
        ctx, "hit" if isinstance(read, CacheHit) else f"miss: {read.reason}", "comparing caches"
    )
    missing = [r for r, s in enumerate(statuses) if s != "hit"]
    if missing:
        return _skip_or_fail(ctx, missing, statuses, "load_only: {ranks} without a usable cache ({reasons})")
    assert isinstance(read, CacheHit)
    statuses = _gather(ctx, _load_hit(ctx, read), "comparing loaded fingerprints")
    _check_statuses(ctx, statuses, "loading the autotune cache")
    ctx.run()
    return AutotuneOutcome(
        decision="load",
        ran_run=True,
        cache_path=ctx.path,
        fingerprint=statuses[ctx.rank],
        reason=None,
    )


RUNNERS: dict[str, Callable[[TuneContext], AutotuneOutcome]] = {
    "leader": run_leader,
    "every_rank": run_every_rank,
    "load_only": run_load_only,
}
