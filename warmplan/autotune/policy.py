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

from warmplan.autotune import Decision, OnMissing, Policy
from warmplan.autotune.cache import (
    FORMAT_VERSION,
    CacheHit,
    CacheMiss,
    CacheWriteError,
    atomic_write,
    decode_cache,
    encode_cache,
    file_holds,
    read_cache,
)
from warmplan.errors import StepError
from warmplan.log import Logger
from warmplan.workers.base import AutotuneBackend, AutotuneLoadError
from warmplan.world import World, WorldError, all_gather_json, ranks_text


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
    on_missing: OnMissing
    run: Callable[[], None]
    log: Logger

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


@dataclass(frozen=True, slots=True)
class RankStatus:
    """What one rank tells the others in a gather: ``ok`` with a value (a
    fingerprint, where one was loaded), or not ok with the reason."""

    ok: bool
    value: str = ""


OK = RankStatus(True)


def _gather(ctx: TuneContext, status: RankStatus, what: str) -> list[RankStatus]:
    try:
        got = all_gather_json(ctx.world, [status.ok, status.value], timeout_s=ctx.timeout_s)
    except WorldError as exc:
        raise ctx.fail(f"{what}: {exc}") from exc
    return [RankStatus(bool(ok), str(value)) for ok, value in got]


def _gather_places(ctx: TuneContext) -> list[tuple[str, str]]:
    try:
        got = all_gather_json(ctx.world, [socket.gethostname(), ctx.path], timeout_s=ctx.timeout_s)
    except WorldError as exc:
        raise ctx.fail(f"comparing cache paths: {exc}") from exc
    return [(str(host), str(path)) for host, path in got]


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


def _skip_or_fail(
    ctx: TuneContext, missing: list[int], statuses: list[RankStatus], skip_reason: str
) -> AutotuneOutcome:
    """Ranks ``missing`` have no usable cache and will not tune: fail (on_missing=fail)
    or skip, every rank alike; ``skip_reason`` is formatted with ``ranks``, ``reasons``."""
    reasons = "; ".join(f"rank {r}: {statuses[r].value}" for r in missing)
    if ctx.on_missing == "fail":
        raise ctx.fail(
            f"no usable autotune cache on {ranks_text(missing)} and on_missing=fail: {reasons}"
        )
    ctx.log.warning("autotune.skipped", step=ctx.step_id, reason=reasons)
    return AutotuneOutcome(
        decision="skip",
        ran_run=False,
        cache_path=ctx.path,
        fingerprint=None,
        reason=skip_reason.format(ranks=ranks_text(missing), reasons=reasons),
    )


def _check_statuses(ctx: TuneContext, statuses: list[RankStatus], what: str) -> None:
    """Raise on this rank if any rank reported a failure in ``statuses``."""
    errors = [(r, s.value) for r, s in enumerate(statuses) if not s.ok]
    if errors:
        detail = "; ".join(f"rank {r}: {m}" for r, m in errors)
        raise ctx.fail(f"{what} failed on {ranks_text([r for r, _ in errors])}: {detail}")


def _load_hit(ctx: TuneContext, hit: CacheHit) -> RankStatus:
    """Install ``hit`` in the backend; ok with its fingerprint, or why not."""
    try:
        ctx.backend.load(hit.payload)
    except AutotuneLoadError as exc:
        return RankStatus(False, f"backend {ctx.backend.name!r} refused {ctx.path}: {exc}")
    except Exception as exc:
        return RankStatus(False, f"loading {ctx.path} raised {type(exc).__name__}: {exc}")
    return RankStatus(True, hit.fingerprint)


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
            msg = _pack(ctx.on_missing, read.reason)
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
            statuses = _gather(
                ctx, RankStatus(False, run_error) if run_error else OK, "after tuning"
            )
            _check_statuses(ctx, statuses, "the tuning run")
            return AutotuneOutcome(
                decision="tune", ran_run=True, cache_path=ctx.path, fingerprint=None, reason=rreason
            )

    raw = body
    status = RankStatus(False, run_error) if run_error else _place_file(ctx, raw, local_leader=True)
    _barrier(ctx, "waiting for every rank to hold the cache file")
    if status.ok:
        status = _place_file(ctx, raw, local_leader=False)
    if status.ok:
        read = read_cache(ctx.path, ctx.metadata)
        status = (
            _load_hit(ctx, read) if isinstance(read, CacheHit) else RankStatus(False, read.reason)
        )
    statuses = _gather(ctx, status, "comparing loaded fingerprints")
    _check_statuses(ctx, statuses, "loading the autotune cache")
    prints = [s.value for s in statuses]
    differ = [r for r, fp in enumerate(prints) if fp != prints[0]]
    if differ:
        detail = ", ".join(f"rank {r}: {prints[r][:16]}" for r in differ)
        raise ctx.fail(
            f"ranks loaded different tuning results: rank 0 has {prints[0][:16]}, {detail}"
        )
    if kind == "load":
        ctx.run()
    ctx.log.info(
        "autotune.loaded", step=ctx.step_id, rank=rank, path=ctx.path, fingerprint=prints[0]
    )
    return AutotuneOutcome(
        decision="tune" if kind == "tune" else "load",
        ran_run=True,
        cache_path=ctx.path,
        fingerprint=prints[rank],
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


def _place_file(ctx: TuneContext, raw: bytes, *, local_leader: bool) -> RankStatus:
    """Make this rank's cache path hold ``raw``; ok, or why not.

    Before the barrier only local rank 0 of each node writes (rank 0 already has);
    after it, a rank whose path is still not right (a per-rank path) writes its own.
    """
    if ctx.rank == 0 or file_holds(ctx.path, raw):
        return OK
    if local_leader and ctx.world.local_rank != 0:
        return OK
    try:
        atomic_write(ctx.path, raw)
    except CacheWriteError as exc:
        return RankStatus(False, str(exc))
    return OK


# -- every_rank -------------------------------------------------------------------------


def run_every_rank(ctx: TuneContext) -> AutotuneOutcome:
    """Each rank tunes or loads its own file; ranks agree only on whether to run."""
    seen: dict[tuple[str, str], int] = {}
    for r, place in enumerate(_gather_places(ctx)):
        if place in seen:
            raise ctx.fail(
                f"policy every_rank needs a cache path per rank, but ranks {seen[place]} and {r} "
                f"share {place[1]} on one host; put {{rank}} in the cache path template"
            )
        seen[place] = r
    read = read_cache(ctx.path, ctx.metadata)
    statuses = _gather(ctx, _hit_or_miss(read), "comparing caches")
    missing = [r for r, s in enumerate(statuses) if not s.ok]
    if missing and ctx.on_missing != "tune":
        return _skip_or_fail(
            ctx, missing, statuses, "{ranks} without a usable cache ({reasons}); on_missing=skip"
        )
    if isinstance(read, CacheHit):
        status = _load_hit(ctx, read)
        if not status.ok:
            raise ctx.fail(status.value)
        ctx.run()
        return AutotuneOutcome(
            decision="load",
            ran_run=True,
            cache_path=ctx.path,
            fingerprint=status.value,
            reason=None,
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
    if not status.ok:
        raise ctx.fail(status.value)
    return AutotuneOutcome(
        decision="tune",
        ran_run=True,
        cache_path=ctx.path,
        fingerprint=status.value,
        reason=read.reason,
    )


# -- load_only ------------------------------------------------------------------------


def run_load_only(ctx: TuneContext) -> AutotuneOutcome:
    """Every rank loads its file; if any rank cannot, all skip (or all fail)."""
    read = read_cache(ctx.path, ctx.metadata)
    statuses = _gather(ctx, _hit_or_miss(read), "comparing caches")
    missing = [r for r, s in enumerate(statuses) if not s.ok]
    if missing:
        return _skip_or_fail(
            ctx, missing, statuses, "load_only: {ranks} without a usable cache ({reasons})"
        )
    assert isinstance(read, CacheHit)
    statuses = _gather(ctx, _load_hit(ctx, read), "comparing loaded fingerprints")
    _check_statuses(ctx, statuses, "loading the autotune cache")
    ctx.run()
    return AutotuneOutcome(
        decision="load",
        ran_run=True,
        cache_path=ctx.path,
        fingerprint=statuses[ctx.rank].value,
        reason=None,
    )


def _hit_or_miss(read: CacheHit | CacheMiss) -> RankStatus:
    return OK if isinstance(read, CacheHit) else RankStatus(False, read.reason)


RUNNERS: dict[Policy, Callable[[TuneContext], AutotuneOutcome]] = {
    "leader": run_leader,
    "every_rank": run_every_rank,
    "load_only": run_load_only,
}
