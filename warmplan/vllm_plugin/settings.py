"""The plugin's settings: the environment variables vLLM's processes read
(documented in :mod:`warmplan.vllm_plugin`) and what ``WARMPLAN_MODE=replace``
may switch off in the installed vLLM. Every bad value is a ``UserError`` at
registration, naming the variable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from warmplan.errors import UserError

PLAN_ENV = "WARMPLAN_PLAN"
MODE_ENV = "WARMPLAN_MODE"
REPLACE_ENV = "WARMPLAN_REPLACE"
REPORT_ENV = "WARMPLAN_REPORT"
MONITOR_ENV = "WARMPLAN_JIT_MONITOR"
MODES = ("after", "replace")
MONITOR_MODES = ("off", "warn", "error")

KERNEL_WARMUP_MODULE = "vllm.model_executor.warmup.kernel_warmup"
GPU_WORKER_MODULE = "vllm.v1.worker.gpu_worker"
# Every module that binds kernel_warmup by name (`from ... import kernel_warmup`):
# its own attribute must be wrapped too, whichever module is imported first.
KERNEL_WARMUP_HOLDERS = (
    KERNEL_WARMUP_MODULE,
    GPU_WORKER_MODULE,
    "vllm.distributed.elastic_ep.elastic_execute",  # a joining worker (0.34)
)

# What WARMPLAN_MODE=replace switches off by default: the parts plans/dsv4.yaml
# stands for. The seed's kernel_warmup module holds the first set, 0.34's the second.
SEED_REPLACED = (
    "_deepseek_v4_sparse_mla_attention_warmup",
    "_deepseek_v4_request_prep_warmup",
    "flashinfer_autotune",
)
V034_REPLACED = ("deepseek_v4_sparse_mla_attention_warmup", "flashinfer_autotune")
REPLACE_ALL = "all"


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def settings(environ: Mapping[str, str] | None = None) -> tuple[str, str, str | None] | None:
    env = _env(environ)
    plan = env.get(PLAN_ENV)
    if not plan:
        return None
    from warmplan.fsutil import foreign_owner

    why = foreign_owner(plan)
    if why is not None:
        raise UserError(
            f"{PLAN_ENV}={plan}: {why}; a plan decides what every vLLM worker runs: "
            "make it yours (chown) and not writable by others (chmod go-w)"
        )
    mode = env.get(MODE_ENV) or "after"
    if mode not in MODES:
        raise UserError(f"{MODE_ENV} must be one of {', '.join(MODES)}: {mode!r}")
    return plan, mode, env.get(REPORT_ENV) or None


def monitor_mode(environ: Mapping[str, str] | None = None) -> str:
    mode = _env(environ).get(MONITOR_ENV) or "off"
    if mode not in MONITOR_MODES:
        raise UserError(f"{MONITOR_ENV} must be one of {', '.join(MONITOR_MODES)}: {mode!r}")
    return mode


RECORD_ENV = "WARMPLAN_RECORD"
RECORD_SAMPLE_ENV = "WARMPLAN_RECORD_SAMPLE"
RECORD_MAX_MB_ENV = "WARMPLAN_RECORD_MAX_MB"


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{name} must be a whole number >= 1: {raw!r}")
    return value


def record_settings(environ: Mapping[str, str] | None = None) -> tuple[str, int, int] | None:
    """``(path template, sample every N, max MB)`` when ``WARMPLAN_RECORD`` is set."""
    env = _env(environ)
    path = env.get(RECORD_ENV)
    if not path:
        return None
    return (
        path,
        _positive_int(env, RECORD_SAMPLE_ENV, 1),
        _positive_int(env, RECORD_MAX_MB_ENV, 64),
    )


# -- what replace mode switches off -------------------------------------------------------


def replaced_functions(
    module_globals: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[str, ...] | None:
    """The names in ``kernel_warmup``'s module that replace mode switches off
    (``None``: the whole ``kernel_warmup``). Raises :class:`UserError` naming every
    part the installed vLLM cannot switch off."""
    from warmplan.workers.vllm.warmups import KERNEL_WARMUP, VLLM_WARMUPS

    raw = (_env(environ).get(REPLACE_ENV) or "").strip()
    if raw == REPLACE_ALL:
        return None
    if raw:
        wanted = [part.strip() for part in raw.split(",") if part.strip()]
    elif all(name in module_globals for name in SEED_REPLACED):
        wanted = list(SEED_REPLACED)
    else:
        wanted = list(V034_REPLACED)
    by_name = {w.name: w for w in VLLM_WARMUPS}
    names: list[str] = []
    problems: list[str] = []
    for part in wanted:
        spec = by_name.get(part)
        if spec is None:
            attribute = part
        elif spec.targets and spec.targets[0][0] == KERNEL_WARMUP:
            attribute = spec.targets[0][1]
        elif spec.targets:
            # Imported into kernel_warmup's module under its own name, or inside the
            # call (then it is not a global and cannot be switched off alone).
            attribute = spec.targets[0][1]
        else:
            problems.append(f"{part!r} is a runner method kernel_warmup calls directly")
            continue
        if callable(module_globals.get(attribute)):
            names.append(attribute)
        else:
            problems.append(f"{part!r}: kernel_warmup's module has no function {attribute!r}")
    if problems:
        from warmplan.workers.vllm.common import vllm_version

        raise UserError(
            f"{REPLACE_ENV}: vLLM {vllm_version()} cannot switch off "
            + "; ".join(problems)
            + f". Name parts kernel_warmup calls by a module-level name, or set {REPLACE_ENV}={REPLACE_ALL}"
            " to run the plan instead of the whole kernel_warmup()."
        )
    return tuple(dict.fromkeys(names))
