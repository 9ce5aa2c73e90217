"""After the whole warmup (kernel warmup and CUDA-graph capture): warmplan's JIT
monitor over every ``execute_model`` (``WARMPLAN_JIT_MONITOR``) and the recorder
of the batches served (``WARMPLAN_RECORD``)."""

from __future__ import annotations

import atexit
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from warmplan.errors import UserError
from warmplan.log import get_logger
from warmplan.vllm_plugin.settings import RECORD_ENV, monitor_mode, record_settings

log = get_logger("warmplan.vllm_plugin")

# -- the JIT monitor after warmup -------------------------------------------------------------

_MONITOR_HINT = (
    "a shape no warmup covered: record the traffic and run `warmplan verify PLAN --trace T "
    "--suggest` for the plan entries that cover it"
)


def _vllm_monitor_active() -> bool:
    """vLLM 0.34 arms its own JIT monitor (Triton, CuTe DSL, TileLang) at the end
    of warmup when ``enable_jit_warmup`` is on."""
    module = sys.modules.get("vllm.utils.jit_monitor")
    is_active = getattr(module, "is_active", None)
    return bool(is_active()) if callable(is_active) else False


def arm_monitor(worker: Any) -> None:
    """After the whole warmup: warmplan's JIT monitor (``WARMPLAN_JIT_MONITOR``) and
    the recorder (``WARMPLAN_RECORD``), which needs the monitor's events too."""
    mode = monitor_mode()
    record = record_settings()
    if mode == "off" and record is None:
        return
    from warmplan.monitor import JitMonitor

    # One report per compile: where vLLM's own monitor already reports Triton
    # compiles, warmplan's counts and attributes them quietly and reports the rest
    # (torch.compile recompiles, which vLLM's does not watch).
    quiet = ("triton",) if _vllm_monitor_active() else ()
    monitor = JitMonitor(mode="off", hint=lambda event: _MONITOR_HINT, quiet_sources=quiet)
    monitor.install()
    monitor.arm(mode)  # type: ignore[arg-type]
    worker._warmplan_monitor = monitor
    worker._warmplan_steps = 0
    worker._warmplan_recorder = None if record is None else _open_recorder(worker, record)
    log.info(
        "warmplan.vllm.jit_monitor",
        mode=mode,
        reported_by_vllm=list(quiet),
        recording=None if record is None else str(worker._warmplan_recorder.path),
    )


def _open_recorder(worker: Any, settings: tuple[str, int, int]) -> Any:
    from warmplan.record import TraceRecorder
    from warmplan.report import report_path
    from warmplan.workers.vllm import VllmWorker

    template, sample_every, max_mb = settings
    adapter = VllmWorker(worker)
    rank = adapter.world.rank
    path = report_path(str(Path(template).expanduser()), rank)
    try:
        recorder = TraceRecorder(
            path,
            sample_every=sample_every,
            max_bytes=max_mb * 1024 * 1024,
            header={"engine": "vllm", "rank": rank, "limits": adapter.limits.as_dict()},
        )
    except OSError as exc:
        raise UserError(f"{RECORD_ENV}={template}: cannot record to {path}: {exc}") from None
    atexit.register(recorder.close)
    return recorder


def scheduled_of(scheduler_output: Any) -> list[tuple[int, int]]:
    """Each scheduled request's ``(new tokens, computed tokens)`` in a vLLM
    ``SchedulerOutput``: new requests carry ``num_computed_tokens`` (a prefix-cache
    hit), running ones their count in ``scheduled_cached_reqs``."""
    scheduled = dict(getattr(scheduler_output, "num_scheduled_tokens", None) or {})
    out: list[tuple[int, int]] = []
    for request in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
        tokens = scheduled.pop(request.req_id, 0)
        out.append((int(tokens), int(request.num_computed_tokens)))
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    for req_id, computed in zip(
        getattr(cached, "req_ids", None) or (),
        getattr(cached, "num_computed_tokens", None) or (),
        strict=False,
    ):
        out.append((int(scheduled.pop(req_id, 0)), int(computed)))
    return out


def serving_step(worker: Any, run: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """One ``execute_model`` after warmup: attributed to ``serving step N`` for the
    monitor; recorded with the compiles it caused when ``WARMPLAN_RECORD`` is set."""
    monitor = getattr(worker, "_warmplan_monitor", None)
    if monitor is None:
        return run(*args, **kwargs)
    step = worker._warmplan_steps = getattr(worker, "_warmplan_steps", 0) + 1
    recorder = getattr(worker, "_warmplan_recorder", None)
    cold = monitor.cold if recorder is not None else None  # late device loads
    before = len(monitor.events) if recorder is not None else 0
    cold_before = len(cold.events) if cold is not None else 0
    try:
        with monitor.attribute(f"serving step {step}"):
            return run(*args, **kwargs)
    finally:
        if recorder is not None:
            scheduler_output = args[0] if args else kwargs.get("scheduler_output")
            from warmplan.record import batch_of

            batch = batch_of(scheduled_of(scheduler_output))
            if batch.num_tokens:
                late = cold.events[cold_before:] if cold is not None else []
                recorder.record_batch(batch, compiles=[*monitor.events[before:], *late], step=step)


def wrap_worker_class(worker_cls: Any) -> None:
    """Arm warmplan's JIT monitor once a worker's whole warmup is over (kernel warmup
    *and* CUDA-graph capture, which compiles too), and watch every ``execute_model``:
    ``warn`` logs each compile while serving, ``error`` raises at the end of the step
    that compiled (``JitCompileError``, naming the kernel and its key); with
    ``WARMPLAN_RECORD``, each step's batch is written to a trace with its compiles."""
    warm = getattr(worker_cls, "compile_or_warm_up_model", None)
    if callable(warm) and not getattr(warm, "__warmplan_wrapped__", False):

        @functools.wraps(warm)
        def compile_or_warm_up_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = warm(self, *args, **kwargs)
            arm_monitor(self)
            return result

        compile_or_warm_up_model.__warmplan_wrapped__ = True  # type: ignore[attr-defined]
        worker_cls.compile_or_warm_up_model = compile_or_warm_up_model
    run = getattr(worker_cls, "execute_model", None)
    if callable(run) and not getattr(run, "__warmplan_wrapped__", False):

        @functools.wraps(run)
        def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            return serving_step(self, functools.partial(run, self), args, kwargs)

        execute_model.__warmplan_wrapped__ = True  # type: ignore[attr-defined]
        worker_cls.execute_model = execute_model
