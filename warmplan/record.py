"""Recording what a worker really runs: ``TraceRecorder`` and ``record()``.

``TraceRecorder`` writes the batches a worker executes after warmup as a batch-level
trace (``warmplan.trace``), each line with the worker's batch counter (``step``) and
the compilations the JIT monitor saw while it ran (``compiles``). It is meant to stay
on in production:

* cheap: a line is formatted by hand from integers (JSON only for the rare batch that
  compiled), written to a buffered file, flushed at most every ``flush_every_s``;
* bounded: past ``max_bytes`` the file is rotated (``trace.jsonl`` ->
  ``trace.jsonl.1`` -> ... up to ``backups`` files), each file a whole trace with
  its own header; ``sample_every=N`` keeps one batch in N, and always every batch
  that compiled;
* safe: a recorder that cannot write logs once and turns itself off, never failing
  the batch; ``close()`` (or the ``with`` block) flushes.

The vLLM plugin calls it from its execute-model hook::

    recorder = TraceRecorder(path, header={"engine": "vllm", "limits": {...}})
    ...
    recorder.record_batch(Batch(decode=3, prefill=(PrefillChunk(500, 1024),)),
                          compiles=new_events)   # CompileEvent or RecordedCompile
    ...
    recorder.close()

``record(plan, worker, trace, recorder)`` does the same on the built-in engine: runs
the plan under the monitor, then serves a trace (scheduled under the worker's
limits) and records every batch with the compilations it caused. The recorded file
replays with ``warmplan verify``, which compares its compilations with the live ones.

Over ~400 lines on purpose: the recorder (the hot path, rotation, sampling) and
``record()`` on the built-in engine share one line format and one test of
record -> verify; they change together.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from warmplan.errors import UserError
from warmplan.fsutil import refuse_foreign
from warmplan.log import get_logger
from warmplan.monitor import CompileEvent, JitMonitor
from warmplan.monitor.cold import ColdEvent, ColdWatcher
from warmplan.plan import Plan
from warmplan.scheduler import DEFAULT_STEP_S, Replay, SchedulerLimits, replay_batches
from warmplan.trace import RecordedCompile, Trace, TraceEntry, TraceKind
from warmplan.verify import engine_name, hint_for, replay_entries
from warmplan.workers.base import Batch, PrefillChunk, ServingWorker, Worker

log = get_logger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_BACKUPS = 3

CompileLike = CompileEvent | ColdEvent | RecordedCompile | Mapping[str, Any]


def _compile_dict(event: CompileLike) -> dict[str, Any]:
    data = dict(event) if isinstance(event, Mapping) else event.to_dict()
    return {
        "kind": str(data["kind"]),
        "name": str(data["name"]),
        "key": str(data["key"]),
        "cache_hit": bool(data.get("cache_hit", False)),
        "duration_s": data.get("duration_s"),
    }


def format_line(batch: Batch, step: int, compiles: Sequence[CompileLike] = ()) -> str:
    """One recorded trace line, newline included (``warmplan.trace`` reads it back)."""
    parts = [f'{{"step": {step:d}']
    if batch.decode:
        parts.append(f', "decode": {batch.decode:d}')
    if batch.prefill:
        chunks = ", ".join(
            f'{{"tokens": {c.tokens:d}, "context": {c.context:d}}}'
            if c.context
            else f'{{"tokens": {c.tokens:d}}}'
            for c in batch.prefill
        )
        parts.append(f', "prefill": [{chunks}]')
    if compiles:
        events = json.dumps([_compile_dict(e) for e in compiles], separators=(", ", ": "))
        parts.append(f', "compiles": {events}')
    parts.append("}\n")
    return "".join(parts)


def batch_of(scheduled: Iterable[tuple[int, int]]) -> Batch:
    """The ``Batch`` of a step from each request's ``(new tokens, computed tokens)``, as
    an engine's scheduler output has them (vLLM: ``num_scheduled_tokens[req]`` and the
    request's ``num_computed_tokens``): one new token is a decode (query length 1, as
    the attention backends split them), more a prefill chunk after its computed part."""
    decode = 0
    chunks = []
    for new, computed in scheduled:
        if new == 1:
            decode += 1
        elif new > 1:
            chunks.append(PrefillChunk(tokens=int(new), context=int(computed)))
    return Batch(decode=decode, prefill=tuple(chunks))


@dataclass(slots=True)
class RecorderStats:
    """Counts a recorder keeps (``TraceRecorder.stats``)."""

    batches_seen: int = 0
    batches_written: int = 0
    compiles_seen: int = 0
    bytes_written: int = 0
    rotations: int = 0
    disabled: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches_seen": self.batches_seen,
            "batches_written": self.batches_written,
            "compiles_seen": self.compiles_seen,
            "bytes_written": self.bytes_written,
            "rotations": self.rotations,
            "disabled": self.disabled,
        }


@dataclass(slots=True)
class _Options:
    max_bytes: int
    backups: int
    sample_every: int
    flush_every_s: float
    header: Mapping[str, Any] = field(default_factory=dict)


class TraceRecorder:
    """Append the batches a worker executes to a JSON Lines trace (see the module doc).

    ``path``: the trace file (its directory is created); an existing file is rotated
    away first, so a restart never mixes two runs in one file.
    ``max_bytes``: rotate when the file would grow past it (``0``: never).
    ``backups``: rotated files kept (``path.1`` newest); ``0`` truncates instead.
    ``sample_every``: write one batch in N (every batch that compiled is written).
    ``flush_every_s``: flush the buffered file at most this often (``0``: every line).
    ``header``: a mapping written as a ``#`` comment line at the top of each file.
    ``kind``: ``"batches"`` (``record_batch``) or ``"requests"`` (``record_request``:
    one line a finished request, a request-level trace any worker can schedule).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        sample_every: int = 1,
        flush_every_s: float = 1.0,
        header: Mapping[str, Any] | None = None,
        kind: TraceKind = "batches",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value, low in (
            ("max_bytes", max_bytes, 0),
            ("backups", backups, 0),
            ("sample_every", sample_every, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f'"{name}" must be an integer >= {low}: {value!r}')
        if flush_every_s < 0:
            raise ValueError(f'"flush_every_s" must be >= 0: {flush_every_s!r}')
        self.path = Path(path)
        self._opts = _Options(max_bytes, backups, sample_every, flush_every_s, dict(header or {}))
        if kind not in ("batches", "requests"):
            raise ValueError(f'"kind" must be batches or requests: {kind!r}')
        self._kind: TraceKind = kind
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._size = 0
        self._last_flush = clock()
        self.stats = RecorderStats()
        # A link or special file another user planted at the path (a shared /tmp) is
        # never followed: it would truncate the file it names, with the server's rights.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            refuse_foreign(str(self.path))  # PermissionError: refused, at start-up
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._rotate_files()
        except OSError as exc:
            self._disable(exc)
            return
        self._open()

    # -- the hot path -------------------------------------------------------------

    def record_batch(
        self, batch: Batch, *, compiles: Sequence[CompileLike] = (), step: int | None = None
    ) -> bool:
        """Record one executed batch and what compiled while it ran; ``True`` if written.

        ``step`` defaults to the recorder's own count of batches seen (0-based).
        Never raises for an I/O problem: the recorder logs it and stops recording.
        """
        if self._kind != "batches":
            raise ValueError('record_batch needs a TraceRecorder(kind="batches")')
        with self._lock:
            stats = self.stats
            seen = stats.batches_seen
            stats.batches_seen = seen + 1
            stats.compiles_seen += len(compiles)
            if self._file is None:
                return False
            if not compiles and seen % self._opts.sample_every:
                return False
            line = format_line(batch, seen if step is None else step, compiles)
            if self._write(line, ascii_only=not compiles, urgent=bool(compiles)):
                stats.batches_written += 1
                return True
            return False

    def record_request(
        self,
        prompt_tokens: int,
        output_tokens: int,
        *,
        cached_tokens: int = 0,
        arrival_s: float | None = None,
        request_id: str | None = None,
    ) -> bool:
        """Record one finished request (a recorder made with ``kind="requests"``):
        its prompt, prefix-cache hit and output lengths, and when it arrived (seconds
        since the recorder started by default). ``True`` if written."""
        if self._kind != "requests":
            raise ValueError('record_request needs a TraceRecorder(kind="requests")')
        with self._lock:
            stats = self.stats
            seen = stats.batches_seen
            stats.batches_seen = seen + 1
            if self._file is None or seen % self._opts.sample_every:
                return False
            when = self._clock() - self._started if arrival_s is None else arrival_s
            fields = [] if request_id is None else [f'"id": {json.dumps(str(request_id))}']
            fields.append(f'"arrival_s": {max(when, 0.0):.3f}')
            fields.append(f'"prompt_tokens": {int(prompt_tokens):d}')
            if cached_tokens:
                fields.append(f'"cached_tokens": {int(cached_tokens):d}')
            fields.append(f'"output_tokens": {int(output_tokens):d}')
            line = "{" + ", ".join(fields) + "}\n"
            if self._write(line, ascii_only=request_id is None, urgent=False):
                stats.batches_written += 1
                return True
            return False

    def _write(self, line: str, *, ascii_only: bool, urgent: bool) -> bool:
        """Append ``line`` (rotating first if it would not fit); the lock is held."""
        if self._file is None:
            return False
        try:
            size = len(line) if ascii_only else len(line.encode("utf-8"))
            if self._opts.max_bytes and self._size + size > self._opts.max_bytes:
                self._rotate()
            assert self._file is not None
            self._file.write(line)
            self._size += size
            self.stats.bytes_written += size
            if self._opts.flush_every_s == 0 or urgent:
                self._file.flush()
                self._last_flush = self._clock()
            else:
                now = self._clock()
                if now - self._last_flush >= self._opts.flush_every_s:
                    self._file.flush()
                    self._last_flush = now
        except OSError as exc:
            self._disable(exc)
            return False
        return True

    # -- files ------------------------------------------------------------------

    def _header_text(self) -> str:
        data = {"warmplan_trace": 1, "kind": self._kind, **self._opts.header}
        if self._opts.sample_every > 1:
            data["sample_every"] = self._opts.sample_every
        return "# " + json.dumps(data, sort_keys=False, default=str) + "\n"

    def _open(self) -> None:
        try:
            self._file = open(self.path, "w", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115 - held open across calls, closed in close()
            header = self._header_text()
            self._file.write(header)
            self._size = len(header.encode("utf-8"))
            self.stats.bytes_written += self._size
        except OSError as exc:
            self._disable(exc)

    def _rotate_files(self) -> None:
        backups = self._opts.backups
        if backups == 0:
            return  # opening with "w" truncates
        for n in range(backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._rotate_files()
        self.stats.rotations += 1
        self._open()
        if self._file is None:
            raise OSError(f"cannot reopen {self.path} after rotating it")

    def _disable(self, exc: BaseException) -> None:
        self.stats.disabled = f"{type(exc).__name__}: {exc}"
        log.warning("trace_recording_stopped", path=str(self.path), error=self.stats.disabled)
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None

    def flush(self) -> None:
        """Write buffered lines to the file now."""
        with self._lock:
            if self._file is not None:
                try:
                    self._file.flush()
                except OSError as exc:
                    self._disable(exc)

    def close(self) -> None:
        """Flush and close the file; later batches are counted but not written."""
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as exc:
                    self._disable(exc)
                self._file = None

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def files(self) -> list[Path]:
        """The trace files written, oldest first (rotated ones, then ``path``)."""
        older = [
            self.path.with_name(f"{self.path.name}.{n}") for n in range(self._opts.backups, 0, -1)
        ]
        return [p for p in [*older, self.path] if p.exists()]


# --------------------------------------------------------------------------- built-in


@dataclass(slots=True, kw_only=True)
class RecordResult:
    """What ``record`` saw: the warmup's compiles and, per served batch, the live ones."""

    batches: int
    warmup_compiles: int
    warmup_cache_loads: int
    events: list[CompileEvent]
    batches_hit: list[int]
    seconds: list[float]
    stats: RecorderStats
    report: Any = None
    replay: Replay | None = None
    cold: list[ColdEvent] = field(default_factory=list)

    @property
    def compiles(self) -> int:
        """Real compiles (eager fallbacks too), not disk-cache loads or autotune misses."""
        return sum(1 for e in self.events if not e.cache_hit and e.kind != "autotune_miss")

    @property
    def autotune_misses(self) -> int:
        return sum(1 for e in self.events if e.kind == "autotune_miss")

    @property
    def cache_loads(self) -> int:
        return sum(1 for e in self.events if e.cache_hit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "warmup": {"compiles": self.warmup_compiles, "cache_loads": self.warmup_cache_loads},
            "live": {
                "compiles": self.compiles,
                "cache_loads": self.cache_loads,
                "device_loads": len(self.cold),
                "autotune_misses": sum(1 for e in self.events if e.kind == "autotune_miss"),
                "batches_hit": self.batches_hit,
                "duration_s": sum(self.seconds),
                "events": [e.to_dict() for e in self.events] + [e.to_dict() for e in self.cold],
            },
            "recorder": self.stats.to_dict(),
            "scheduling": None if self.replay is None else self.replay.to_dict(),
        }


def record(
    plan: Plan,
    worker: Worker,
    trace: Trace,
    recorder: TraceRecorder,
    *,
    limits: SchedulerLimits | None = None,
    step_s: float = DEFAULT_STEP_S,
) -> RecordResult:
    """Run ``plan`` on ``worker``, serve ``trace`` (requests are scheduled and batches
    re-chunked under the worker's limits) and record each batch with the compilations
    it caused. The recorder is closed at the end."""
    from warmplan.executor import run_plan

    if not isinstance(worker, ServingWorker):
        raise UserError(
            f"warmplan record serves batches through the worker's serving path, "
            f"but the {engine_name(worker)!r} worker has no execute(batch)"
        )
    replay = replay_batches(trace, limits or SchedulerLimits.of_worker(worker), step_s=step_s)
    entries = list(replay.entries)
    hit: list[int] = []
    monitor = JitMonitor(hint=hint_for([entries]))
    cold = ColdWatcher(monitor.store)
    cold_seen = [0]

    def after(index: int, entry: TraceEntry, events: list[CompileEvent]) -> None:
        new_cold = cold.events[cold_seen[0] :]
        cold_seen[0] += len(new_cold)
        everything: list[CompileLike] = [*events, *new_cold]
        recorder.record_batch(entry.batch, compiles=everything, step=index)
        if everything:
            hit.append(index)

    monitor.install()
    cold.install()
    try:
        report = run_plan(plan, worker, monitor=monitor)
        warmup = monitor.events
        warmup_cold = cold_seen[0] = len(cold.events)
        monitor.arm("warn")
        seconds = replay_entries(worker, entries, monitor, path=trace.path, after_batch=after)
        live = monitor.events[len(warmup) :]
        live_cold = cold.events[warmup_cold:]
    finally:
        cold.uninstall()
        monitor.uninstall()
        recorder.close()
    return RecordResult(
        batches=len(entries),
        warmup_compiles=sum(1 for e in warmup if not e.cache_hit),
        warmup_cache_loads=sum(1 for e in warmup if e.cache_hit),
        events=live,
        batches_hit=hit,
        seconds=seconds,
        stats=recorder.stats,
        report=report,
        replay=replay,
        cold=live_cold,
    )
