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
``together``
    Every rank tunes, under the backend's cross-rank timing reduction (FlashInfer's
    ``set_autotune_process_group``: each tactic's time is mean-reduced over the tune
    group, so every rank picks the same tactic), and keeps its own file (entries may
    be rank-keyed). Before anyone runs anything the ranks all-gather what their files
    hold (the table's metadata and entry count); only when every rank has a usable
    file and they all match does every rank load, and only when every rank loaded is
    the tuning forward skipped. Anything short of unanimous: every rank clears what
    it loaded and tunes, so no rank skips a reduction the others wait in.
``every_rank``
    Each rank keeps its own file; the cache path must differ per rank on a host
    (put ``{rank}`` in the path template). If any rank lacks a usable file, every
    rank tunes (so all run the same forward under tuning).
``load_only``
    Never tunes. A missing or mismatched file follows ``on_missing``: ``skip`` (the
    default, with a warning) or ``fail``.

Whether a rank runs its run is always decided collectively, so no rank runs a
forward the others do not (a forward may itself hold collectives).

Over ~400 lines because the four policies are one protocol: they share the
``TuneContext``, the typed rank statuses and the collective helpers that word every
failure alike, and each decides in the same order (agree, tune or load, compare).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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
    fingerprint,
    read_cache,
    read_raw,
)
from warmplan.autotune.table import Table, TableError, foreign_fields, parse_table
from warmplan.errors import StepError
from warmplan.log import Logger
from warmplan.workers.base import AutotuneBackend, AutotuneLoadError
from warmplan.world import World, WorldError, all_gather_json, ranks_text


@dataclass(frozen=True, slots=True, kw_only=True)
class AutotuneOutcome:
    """What an autotune step did on this rank; the executor puts it in the report.

    ``ran_run`` is True when the step ran its run (tuning or after loading), so the
    step it replaces is covered; ``fingerprint`` is the sha256 of the results loaded
    or tuned. ``ignored``: why this rank's file was not used although it exists
    (``ignored: cuda_version differs: ...``). ``run_skipped``: why the run did not
    run after a load. ``table``: what the results hold, when they are a FlashInfer
    table (ops and tuned token buckets).
    """

    decision: Decision
    ran_run: bool
    cache_path: str | None
    fingerprint: str | None
    reason: str | None
    ignored: str | None = None
    run_skipped: str | None = None
    table: Table | None = None


@runtime_checkable
class RankedBackend(Protocol):
    """A backend whose ranks can tune together (FlashInfer's shape): besides the
    ``AutotuneBackend`` protocol, the running stack's table metadata, a way to clear
    what was loaded or tuned, tuning under a cross-rank timing reduction with ops
    left out, and per-pass token buckets."""

    @property
    def tunes_together(self) -> bool:
        """Whether this backend's results are FlashInfer tables its ranks tune together."""

    def running_metadata(self) -> Mapping[str, str] | None:
        """The metadata the running stack stamps on (and demands of) a table."""

    def clear(self) -> None:
        """Forget every loaded and tuned result (FlashInfer's ``clear_cache``)."""

    def tune_process_group(self, world: World) -> Any:
        """The process group whose ranks reduce timings together; None for none."""

    def tuning_together(
        self, *, group: Any, skip_ops: tuple[str, ...]
    ) -> contextlib.AbstractContextManager[None]:
        """Tune, reducing each tactic's timing over ``group``, leaving ``skip_ops`` out."""

    def pass_scope(
        self, *, buckets: tuple[int, ...] | None, round_up: bool | None
    ) -> contextlib.AbstractContextManager[None]:
        """Inside tuning: tune the enclosed run at these token buckets."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TuneContext:
    """Everything a policy needs; built by ``warmplan.steps.autotune.run_autotune``.

    ``run`` runs the step's run plainly; ``tune_run`` runs it the way it tunes (per
    pass bucket scopes); ``raw``: the file is the backend's payload itself (vLLM's
    layout), not warmplan's wrapper; ``run_after_load``: run the run after a load.
    """

    step_id: str
    backend: AutotuneBackend
    world: World
    path: str
    metadata: Mapping[str, str]
    timeout_s: float
    on_missing: OnMissing
    run: Callable[[], None]
    log: Logger
    tune_run: Callable[[], None] | None = None
    raw: bool = False
    run_after_load: bool = True
    skip_ops: tuple[str, ...] = ()
    forward: str = "the run"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.world.rank

    def fail(self, message: str) -> StepError:
        return StepError(self.step_id, message, rank=self.rank)

    def tuning(self, *, together: bool = False) -> contextlib.AbstractContextManager[None]:
        """The backend's tuning context; with ``together``, under its timing reduction."""
        backend = ranked(self.backend)
        if backend is not None:
            group = backend.tune_process_group(self.world) if together else None
            return backend.tuning_together(group=group, skip_ops=self.skip_ops)
        return self.backend.tuning()

    def run_tuning(self) -> None:
        (self.tune_run or self.run)()


def ranked(backend: AutotuneBackend) -> RankedBackend | None:
    """``backend`` as a ``RankedBackend`` when it is one and says it tunes together."""
    if isinstance(backend, RankedBackend) and backend.tunes_together:
        return backend
    return None


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


# -- reading a rank's own file ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalRead:
    """This rank's file: a usable ``hit`` (with its ``table`` when it is a FlashInfer
    table), or why not (``reason``; ``ignored`` when a file exists but is not used)."""

    hit: CacheHit | None
    reason: str | None = None
    ignored: str | None = None
    table: Table | None = None


def table_of(payload: bytes) -> Table | None:
    """The FlashInfer table ``payload`` holds, or None when it holds something else."""
    try:
        return parse_table(payload)
    except TableError:
        return None


def read_local(ctx: TuneContext) -> LocalRead:
    """Read this rank's file and check it the way its loader would, *before* loading:
    a FlashInfer table whose version/GPU fields differ from the running stack is
    ignored, saying which field differs (FlashInfer itself would only warn)."""
    read = read_raw(ctx.path) if ctx.raw else read_cache(ctx.path, ctx.metadata)
    if isinstance(read, CacheMiss):
        return LocalRead(
            hit=None, reason=read.reason, ignored=f"ignored: {read.reason}" if read.exists else None
        )
    table: Table | None = None
    backend = ranked(ctx.backend)
    if backend is not None:
        try:
            table = parse_table(read.payload)
        except TableError as exc:
            why = f"cache file {ctx.path} is not a FlashInfer tuning table: {exc}"
            return LocalRead(hit=None, reason=why, ignored=f"ignored: {why}")
        running = backend.running_metadata()
        foreign = foreign_fields(table.metadata, running) if running is not None else []
        if foreign:
            why = f"cache file {ctx.path}: " + "; ".join(foreign)
            return LocalRead(hit=None, reason=why, ignored="ignored: " + "; ".join(foreign))
    return LocalRead(hit=read, table=table)


def _note_ignored(ctx: TuneContext, local: LocalRead) -> None:
    if local.ignored:
        ctx.log.warning(
            "autotune.cache_unusable",
            step=ctx.step_id,
            rank=ctx.rank,
            path=ctx.path,
            reason=local.reason,
            ignored=local.ignored,
        )


def _clear(ctx: TuneContext) -> None:
    backend = ranked(ctx.backend)
    if backend is not None:
        backend.clear()


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


def cache_unwritable(path: str) -> str | None:
    """Why the cache file at ``path`` could not be written, checked before tuning:
    the nearest existing directory above it must be a writable directory (a
    read-only file system is refused even for root). ``None`` when it can be."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


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
    ignored: str | None = None
    if rank == 0:
        local = read_local(ctx)
        if local.hit is not None:
            msg = _pack("load", None, local.hit.raw)
        else:
            _note_ignored(ctx, local)
            ignored = local.ignored
            msg = _pack(ctx.on_missing, local.reason)
            why = cache_unwritable(ctx.path) if ctx.on_missing == "tune" else None
            if why is not None:
                # Tuning takes minutes; its results would be lost at the write. Every
                # rank fails now instead, naming the file.
                msg = _pack("unwritable", why)
    kind, reason, body = _unpack(_bcast(ctx, msg, "waiting for rank 0's tune-or-load decision"))
    ctx.log.info("autotune.decision", step=ctx.step_id, rank=rank, decision=kind, reason=reason)
    if kind == "unwritable":
        raise ctx.fail(
            f"rank 0 cannot write the cache file {ctx.path} ({reason}); tuning would be lost, "
            "so nothing was tuned: make the cache root writable, or set --cache-root"
        )

    if kind == "skip":
        ctx.log.warning("autotune.skipped", step=ctx.step_id, reason=reason)
        return AutotuneOutcome(
            decision="skip",
            ran_run=False,
            cache_path=ctx.path,
            fingerprint=None,
            reason=f"rank 0: {reason}; on_missing=skip",
            ignored=ignored,
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
                decision="tune",
                ran_run=True,
                cache_path=ctx.path,
                fingerprint=None,
                reason=rreason,
                ignored=ignored,
            )

    raw = body
    status = RankStatus(False, run_error) if run_error else _place_file(ctx, raw, local_leader=True)
    _barrier(ctx, "waiting for every rank to hold the cache file")
    if status.ok:
        status = _place_file(ctx, raw, local_leader=False)
    loaded: CacheHit | None = None
    if status.ok:
        local = read_local(ctx)
        loaded = local.hit
        status = (
            _load_hit(ctx, loaded) if loaded is not None else RankStatus(False, local.reason or "")
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
    ran_run = kind == "tune" or ctx.run_after_load
    if kind == "load" and ran_run:
        ctx.run()
    ctx.log.info(
        "autotune.loaded", step=ctx.step_id, rank=rank, path=ctx.path, fingerprint=prints[0]
    )
    return AutotuneOutcome(
        decision="tune" if kind == "tune" else "load",
        ran_run=ran_run,
        cache_path=ctx.path,
        fingerprint=prints[rank],
        reason=reason if kind == "tune" else None,
        ignored=ignored,
        run_skipped=None if ran_run else _skipped_run(ctx),
        table=table_of(loaded.payload) if loaded is not None else None,
    )


def _skipped_run(ctx: TuneContext) -> str:
    return f"every rank loaded its results; {ctx.forward} was not run (run_after_load: false)"


def _leader_tune(ctx: TuneContext) -> tuple[bytes, StepError | None]:
    """On rank 0: tune, export, write the file. Returns the message for the others."""
    try:
        with ctx.tuning():
            ctx.run_tuning()
        payload = ctx.backend.export()
    except Exception as exc:
        err = ctx.fail(f"tuning raised {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return _pack("error", f"{type(exc).__name__}: {exc}"), err
    if not payload:
        return _pack("empty", "tuning produced no results; default tactics stay in use"), None
    raw = _file_bytes(ctx, payload)
    try:
        atomic_write(ctx.path, raw)
    except CacheWriteError as exc:
        return _pack("error", str(exc)), ctx.fail(str(exc))
    ctx.log.info("autotune.written", step=ctx.step_id, path=ctx.path, bytes=len(raw))
    return _pack("ok", None, raw), None


def _file_bytes(ctx: TuneContext, payload: bytes) -> bytes:
    """What the cache file holds: the payload itself in vLLM's layout, else warmplan's
    wrapper (metadata, checksum)."""
    return payload if ctx.raw else encode_cache(ctx.metadata, payload)


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


def _check_per_rank_paths(ctx: TuneContext, policy: str) -> None:
    seen: dict[tuple[str, str], int] = {}
    for r, place in enumerate(_gather_places(ctx)):
        if place in seen:
            raise ctx.fail(
                f"policy {policy} needs a cache path per rank, but ranks {seen[place]} and {r} "
                f"share {place[1]} on one host; put {{rank}} in the cache path template"
            )
        seen[place] = r


def _tune_own(ctx: TuneContext, *, together: bool) -> tuple[RankStatus, bytes]:
    """Tune on this rank and write its own file; the status says whether that worked
    (never raises for what the others must hear about)."""
    try:
        with ctx.tuning(together=together):
            ctx.run_tuning()
        payload = ctx.backend.export()
    except Exception as exc:
        return RankStatus(False, f"tuning raised {type(exc).__name__}: {exc}"), b""
    if not payload:
        return OK, b""
    try:
        atomic_write(ctx.path, _file_bytes(ctx, payload))
    except CacheWriteError as exc:
        return RankStatus(False, str(exc)), payload
    ctx.log.info("autotune.written", step=ctx.step_id, rank=ctx.rank, path=ctx.path)
    return OK, payload


def run_every_rank(ctx: TuneContext) -> AutotuneOutcome:
    """Each rank keeps its own file. Every rank loads when every rank has a usable
    file; when any lacks one, every rank tunes (a rank that loaded while the others
    tune would run a different forward, and could miss a collective they hold)."""
    _check_per_rank_paths(ctx, "every_rank")
    local = read_local(ctx)
    _note_ignored(ctx, local)
    statuses = _gather(
        ctx,
        OK if local.hit is not None else RankStatus(False, local.reason or ""),
        "comparing caches",
    )
    missing = [r for r, s in enumerate(statuses) if not s.ok]
    if missing and ctx.on_missing != "tune":
        return _skip_or_fail(
            ctx, missing, statuses, "{ranks} without a usable cache ({reasons}); on_missing=skip"
        )
    if not missing and local.hit is not None:
        status = _load_hit(ctx, local.hit)
        statuses = _gather(ctx, status, "comparing loaded results")
        _check_statuses(ctx, statuses, "loading the autotune cache")
        if ctx.run_after_load:
            ctx.run()
        return AutotuneOutcome(
            decision="load",
            ran_run=ctx.run_after_load,
            cache_path=ctx.path,
            fingerprint=status.value,
            reason=None,
            run_skipped=None if ctx.run_after_load else _skipped_run(ctx),
            table=local.table or table_of(local.hit.payload),
        )
    why = "; ".join(f"rank {r}: {statuses[r].value}" for r in missing)
    reason = local.reason if local.hit is None else f"every rank tunes: {why}"
    ctx.log.info(
        "autotune.decision", step=ctx.step_id, rank=ctx.rank, decision="tune", reason=reason
    )
    status, payload = _tune_own(ctx, together=False)
    _check_statuses(ctx, _gather(ctx, status, "after tuning"), "tuning")
    if not payload:
        return AutotuneOutcome(
            decision="tune",
            ran_run=True,
            cache_path=ctx.path,
            fingerprint=None,
            reason="tuning produced no results; default tactics stay in use",
            ignored=local.ignored,
        )
    hit = (
        decode_cache(_file_bytes(ctx, payload), ctx.metadata, path=ctx.path)
        if not ctx.raw
        else CacheHit(payload=payload, fingerprint=fingerprint(payload), raw=payload)
    )
    assert isinstance(hit, CacheHit)
    status = _load_hit(ctx, hit)
    if not status.ok:
        raise ctx.fail(status.value)
    return AutotuneOutcome(
        decision="tune",
        ran_run=True,
        cache_path=ctx.path,
        fingerprint=status.value,
        reason=reason,
        ignored=local.ignored,
        table=table_of(payload),
    )


# -- together ---------------------------------------------------------------------------


def run_together(ctx: TuneContext) -> AutotuneOutcome:
    """Every rank tunes together, or every rank loads its own file and skips the
    tuning forward: the unanimity protocol (module docstring)."""
    if ranked(ctx.backend) is None:
        raise ctx.fail(
            f"policy together needs a backend whose ranks can tune together "
            f"(flashinfer); {ctx.backend.name!r} cannot: use leader"
        )
    _check_per_rank_paths(ctx, "together")
    local = read_local(ctx)
    _note_ignored(ctx, local)
    mine = (
        RankStatus(True, local.table.identity())
        if local.hit and local.table
        else RankStatus(
            local.hit is not None,
            "" if local.hit is not None else (local.reason or "no usable file"),
        )
    )
    # 1. What every rank's file holds (metadata and entry count), before anyone loads.
    held = _gather(ctx, mine, "comparing what each rank's cache holds")
    missing = [r for r, s in enumerate(held) if not s.ok]
    idents = {s.value for s in held if s.ok}
    why: str | None = None
    if missing:
        why = "; ".join(f"rank {r}: {held[r].value}" for r in missing)
    elif len(idents) > 1:
        why = "the ranks' files differ: " + ", ".join(
            f"rank {r}: {s.value}" for r, s in enumerate(held)
        )
    else:
        # 2. Unanimous: every rank loads; 3. every rank must have loaded.
        assert local.hit is not None
        status = _load_hit(ctx, local.hit)
        loads = _gather(ctx, status, "comparing load results")
        failed = [r for r, s in enumerate(loads) if not s.ok]
        if not failed:
            if ctx.run_after_load:
                ctx.run()
            ctx.log.info(
                "autotune.loaded",
                step=ctx.step_id,
                rank=ctx.rank,
                path=ctx.path,
                fingerprint=status.value,
                ran_run=ctx.run_after_load,
            )
            return AutotuneOutcome(
                decision="load",
                ran_run=ctx.run_after_load,
                cache_path=ctx.path,
                fingerprint=status.value,
                reason=None,
                run_skipped=None if ctx.run_after_load else _skipped_run(ctx),
                table=local.table,
            )
        why = "loading failed on " + "; ".join(f"rank {r}: {loads[r].value}" for r in failed)
    # Short of unanimous: nobody keeps what it loaded; every rank tunes from empty.
    _clear(ctx)
    if ctx.on_missing != "tune":
        out = _skip_or_fail(
            ctx,
            missing or list(range(ctx.world.world_size)),
            held if missing else [RankStatus(False, why or "")] * ctx.world.world_size,
            "{ranks} without a usable cache ({reasons}); on_missing=skip",
        )
        return AutotuneOutcome(
            decision=out.decision,
            ran_run=False,
            cache_path=out.cache_path,
            fingerprint=None,
            reason=out.reason,
            ignored=local.ignored,
        )
    ctx.log.info("autotune.decision", step=ctx.step_id, rank=ctx.rank, decision="tune", reason=why)
    status, payload = _tune_own(ctx, together=True)
    _check_statuses(ctx, _gather(ctx, status, "after tuning together"), "tuning")
    return AutotuneOutcome(
        decision="tune",
        ran_run=True,
        cache_path=ctx.path,
        fingerprint=fingerprint(payload) if payload else None,
        reason=why
        if payload
        else f"{why}; tuning produced no results, default tactics stay in use",
        ignored=local.ignored,
        table=table_of(payload) if payload else None,
    )


# -- load_only ------------------------------------------------------------------------


def run_load_only(ctx: TuneContext) -> AutotuneOutcome:
    """Every rank loads its file; if any rank cannot, all skip (or all fail)."""
    local = read_local(ctx)
    _note_ignored(ctx, local)
    statuses = _gather(
        ctx,
        OK if local.hit is not None else RankStatus(False, local.reason or ""),
        "comparing caches",
    )
    missing = [r for r, s in enumerate(statuses) if not s.ok]
    if missing:
        out = _skip_or_fail(
            ctx, missing, statuses, "load_only: {ranks} without a usable cache ({reasons})"
        )
        return AutotuneOutcome(
            decision=out.decision,
            ran_run=False,
            cache_path=out.cache_path,
            fingerprint=None,
            reason=out.reason,
            ignored=local.ignored,
        )
    assert local.hit is not None
    statuses = _gather(ctx, _load_hit(ctx, local.hit), "comparing loaded fingerprints")
    _check_statuses(ctx, statuses, "loading the autotune cache")
    if ctx.run_after_load:
        ctx.run()
    return AutotuneOutcome(
        decision="load",
        ran_run=ctx.run_after_load,
        cache_path=ctx.path,
        fingerprint=statuses[ctx.rank].value,
        reason=None,
        run_skipped=None if ctx.run_after_load else _skipped_run(ctx),
        table=local.table or table_of(local.hit.payload),
    )


RUNNERS: dict[Policy, Callable[[TuneContext], AutotuneOutcome]] = {
    "leader": run_leader,
    "together": run_together,
    "every_rank": run_every_rank,
    "load_only": run_load_only,
}
