"""What the subcommands share: plan loading, worker construction, tables."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from warmplan.builtin_keys import DEVICES
from warmplan.errors import UserError
from warmplan.fsutil import default_cache_root
from warmplan.plan import Plan, load_plan


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """``--worker``, ``--device``, ``--model-config``: which worker runs the plan."""
    parser.add_argument(
        "--worker",
        choices=["builtin"],
        default="builtin",
        help="the worker to run on (vLLM runs plans through its plugin; see docs/vllm.md)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="device for the built-in engine (auto: cuda when available)",
    )
    parser.add_argument(
        "--model-config",
        metavar="FILE",
        help="YAML/JSON mapping merged over the plan's builtin block",
    )


def load_plan_or_exit(path: str) -> Plan:
    """Load a plan; a bad one raises ``PlanError`` (exit 1 with every problem)."""
    return load_plan(Path(path))


def read_model_config(path: str | None) -> dict[str, Any]:
    """The ``--model-config`` mapping (empty when not given), checked against the
    schema of a plan's ``builtin`` block, with ``file:line:column`` on every problem."""
    if path is None:
        return {}
    from warmplan.diagnostics import validate_text
    from warmplan.schema import BUILTIN

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read --model-config: {exc}") from None
    return validate_text(BUILTIN, text, file=path)


def make_worker(args: argparse.Namespace, plan: Plan) -> Any:
    """Build the worker the command runs on (the built-in engine)."""
    config = {**plan.builtin, **read_model_config(getattr(args, "model_config", None))}
    device = getattr(args, "device", "auto")
    source = "the plan's builtin block" + (
        f" and {args.model_config}" if getattr(args, "model_config", None) else ""
    )
    from warmplan.world import launch_env

    _, _, world_size = launch_env()  # a bad RANK or WORLD_SIZE is named before anything is built
    if world_size > 1:
        bound_compile_locks(join_timeout(plan))
    try:
        preflight(plan, config, device, getattr(args, "cache_root", None))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{plan.path}: builtin: {exc} (from {source})") from None
    import warnings

    # torch warns at import when numpy is absent; warmplan never needs numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    try:
        import torch
    except ImportError:
        raise UserError(
            "warmplan run needs torch: pip install torch (the README pins torch==2.13.0 for CPU machines)"
        ) from None
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    from warmplan.workers.builtin import build_worker
    from warmplan.world import current_world

    world = current_world(timeout_s=join_timeout(plan))
    try:
        return build_worker(
            config, device=device, world=world, cache_root=getattr(args, "cache_root", None)
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{plan.path}: builtin: {exc} (from {source})") from None


def bound_compile_locks(timeout_s: float) -> None:
    """Ranks on one host share inductor's cache and its file locks; a peer that hangs
    holding one would stall the others for torch's 600 s lock timeout, past the plan's
    ``timeout_s`` (probe D8). Bound the wait by the plan's longest timeout, unless the
    operator set ``TORCHINDUCTOR_FILE_LOCK_TIMEOUT``. Inductor reads the variable at
    import; a module already imported is updated too."""
    if "TORCHINDUCTOR_FILE_LOCK_TIMEOUT" in os.environ:
        return
    seconds = max(1, math.ceil(timeout_s))
    os.environ["TORCHINDUCTOR_FILE_LOCK_TIMEOUT"] = str(seconds)
    for module, name in (
        ("torch._inductor.codecache", "LOCK_TIMEOUT"),
        ("torch._inductor.config", "file_lock_timeout"),
    ):
        if module in sys.modules:
            setattr(sys.modules[module], name, seconds)


def join_timeout(plan: Plan) -> float:
    """How long this rank waits to join its peers: the longest wait the plan allows
    (its autotune steps' and shared compile caches' ``timeout_s``), else the default."""
    from warmplan.autotune import DEFAULT_TIMEOUT_S
    from warmplan.steps.autotune import AutotuneStep

    waits = [s.cache.timeout_s for s in plan.steps if isinstance(s, AutotuneStep)]
    if plan.compile_cache.share:
        waits.append(plan.compile_cache.timeout_s)
    return max(waits, default=DEFAULT_TIMEOUT_S)


def preflight(plan: Plan, config: Mapping[str, Any], device: str, cache_root: str | None) -> None:
    """Before the engine is built (seconds) or a step runs (minutes): resolve the plan
    against the limits and facts of the engine ``config`` describes, and check that
    every batch it will run fits that engine (``ValueError`` naming the step and the
    field to change). The same check runs again in the executor."""
    from warmplan.resolve import resolve
    from warmplan.steps.base import CacheContext
    from warmplan.workers.base import Limits
    from warmplan.workers.builtin.config import EngineConfig, check_steps, facts_for

    data = dict(config)
    if device != "auto":
        data["device"] = device
    engine = EngineConfig.from_mapping(data)
    if engine.device == "cpu":  # known without importing torch (seconds)
        facts = facts_for(engine, "cpu", None)
    else:
        from warmplan.workers.builtin.worker import facts_of

        facts = facts_of(engine)
    limits = Limits(
        max_num_tokens=engine.max_num_tokens,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_num_seqs=engine.max_num_seqs,
    )
    resolved = resolve(
        plan, limits, facts, CacheContext(cache_root=cache_root or default_cache_root())
    )
    check_steps(engine, resolved.steps)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain, aligned text table (stable for tests and logs)."""
    cells = [[str(c) for c in columns]] + [
        ["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], file: TextIO | None = None
) -> None:
    print(format_table(rows, columns), file=file or sys.stdout)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def tokens_text(requested: Sequence[int], applied: Sequence[int]) -> str:
    """``1-16,32 -> 1-8`` style summary of requested and applied counts."""
    req, app = _compact(requested), _compact(applied)
    return req if req == app else f"{req} -> {app or 'none'}"


def _compact(values: Sequence[int]) -> str:
    out: list[str] = []
    i = 0
    vals = list(values)
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if j - i < 2 else f"{vals[i]}-{vals[j]}")
        if 0 < j - i < 2:
            out.extend(str(v) for v in vals[i + 1 : j + 1])
        i = j + 1
    return ",".join(out)
