"""What warmup buys: the first request of every shape a plan covers, with and without it.

For each shape the plan covers (each slot-mapping token count, each dummy-run shape
and size, after clamping to the worker), measured in fresh processes so that no
in-memory cache carries over, each with empty on-disk caches (its own
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR):

* ``cold``   - the shape's first call in a process that ran no warmup;
* ``warm``   - its first call after the whole plan ran (in one process for all
  shapes, or one each with ``--isolate``); with ``--warm-runs N``, the median of N
  such processes run one after another on one compile-cache directory (the first
  starts it empty, the others load from it, like a restarted server). Unless
  ``--no-prime``, each first call comes right after one call of another,
  already measured shape (of the same kind where there is one), so that it meets
  the machine as busy as the steady calls do;
* ``steady`` - the median of ``--repeat`` further calls, back to back;
* ``switched`` - the median of calls each made right after the primer call, as the
  first call was: the control that tells what being new costs a shape
  (warm/switched) from what following other work costs any call;
* ``idle``   - the median of calls each made after ``--pause`` seconds of idling,
  which is what a request meets on a server that was not busy a moment before
  (measured after all the first and steady calls: a call right after a pause is
  slow, and so is the next one for a while).

A dummy-run shape is called the way serving would (``worker.execute`` of the batch
the engine's dummy run builds) when the worker can; a slot-mapping size through
``worker.slot_mapping``. Prints a table with the ratios warm/steady and cold/steady,
and the compiles the monitor saw in each first call.

    python bench/first_request.py --plan plans/builtin-smoke.yaml --device cpu
    python bench/first_request.py --plan plans/dense-llm.yaml --device cuda --json out.json
    python bench/first_request.py --plan plans/dsv4.yaml --warm-runs 3 --cold-only 'uniform_decode*'

``--only`` and ``--cold-only`` take labels (``"uniform_decode 8"``), step ids, or
prefixes ending in ``*``; ``--cold-only`` with no word measures no cold call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Shape = dict[str, Any]  # {"step", "kind", "shape", "tokens", "prior_context", "label"}


# -- in the child process ---------------------------------------------------------------


def _make_worker(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The plan and a built-in engine for it, as ``warmplan run`` builds them (one rank)."""
    from warmplan.diagnostics import validate_text
    from warmplan.plan import load_plan
    from warmplan.schema import BUILTIN
    from warmplan.workers.builtin import build_worker

    plan = load_plan(Path(spec["plan"]))
    model_config = spec.get("model_config")
    extra = (
        validate_text(BUILTIN, Path(model_config).read_text(encoding="utf-8"), file=model_config)
        if model_config
        else {}
    )
    config = {**plan.builtin, **extra}
    if spec["device"] == "auto":
        config.pop("device", None)
    return plan, build_worker(config, device=spec["device"])


def plan_shapes(plan: Any, worker: Any) -> list[Shape]:
    """Every shape the plan covers on ``worker``, after clamping; duplicates once."""
    from warmplan.executor import resolve_for

    resolved = resolve_for(plan, worker)
    out: list[Shape] = []
    seen: set[tuple[Any, ...]] = set()
    for step in resolved.steps:
        if step.skipped is not None or step.kind not in ("slot_mapping", "dummy_run"):
            continue
        for n in step.applied:
            key = (step.kind, step.shape, n, step.prior_context)
            if key in seen:
                continue
            seen.add(key)
            if step.kind == "slot_mapping":
                label = f"slot_mapping {n}"
            else:
                ctx = f" ctx {step.prior_context}" if step.prior_context else ""
                label = f"{step.shape} {n}{ctx}"
            out.append(
                {
                    "step": step.id,
                    "kind": step.kind,
                    "shape": step.shape,
                    "tokens": n,
                    "prior_context": step.prior_context,
                    "label": label,
                }
            )
    return out


def _batch_for(shape: Shape, max_num_seqs: int) -> Any:
    """The batch the built-in engine's dummy run builds for ``shape`` (runner.dummy_specs)."""
    from warmplan.workers.base import Batch, PrefillChunk

    n, prior = shape["tokens"], shape["prior_context"]
    if shape["shape"] == "mixed":
        dec = min(n // 2, max_num_seqs - 1)
        return Batch(decode=dec, prefill=(PrefillChunk(n - dec, prior),))
    if shape["shape"] == "single_prefill":
        return Batch(prefill=(PrefillChunk(n, prior),))
    if shape["shape"] == "uniform_decode":
        return Batch(decode=min(n, max_num_seqs))
    return Batch(prefill=(PrefillChunk(n, 0),))


def _caller(worker: Any, shape: Shape, how: str) -> Any:
    from warmplan.workers.base import ServingWorker

    if shape["kind"] == "slot_mapping":
        return lambda: worker.slot_mapping(shape["tokens"])
    if how == "execute" and isinstance(worker, ServingWorker):
        batch = _batch_for(shape, worker.limits.max_num_seqs)
        return lambda: worker.execute(batch)
    return lambda: worker.dummy_run(
        shape["shape"], shape["tokens"], prior_context=shape["prior_context"], force_attention=True
    )


def _timed(worker: Any, call: Any) -> float:
    started = time.perf_counter()
    call()
    worker.synchronize()
    return time.perf_counter() - started


def _primer(shapes: list[Shape], i: int) -> int | None:
    """The shape to call right before shape ``i``'s first call: the last one measured
    of the same kind and dummy-run shape, else of the same kind, else the one before.
    Never a shape not measured yet (its own first call would be spent), so the first
    shape, which comes straight after the plan, has none."""
    if i == 0:
        return None
    for keys in (("kind", "shape"), ("kind",)):
        for j in range(i - 1, -1, -1):
            if all(shapes[j][k] == shapes[i][k] for k in keys):
                return j
    return i - 1


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement (``spec['mode']`` cold or warm) and return its numbers."""
    from warmplan.log import configure
    from warmplan.monitor import JitMonitor

    configure("console", "warning")
    started = time.perf_counter()
    plan, worker = _make_worker(spec)
    shapes = spec.get("shapes") or plan_shapes(plan, worker)
    build_s = time.perf_counter() - started
    out: dict[str, Any] = {"mode": spec["mode"], "build_s": build_s, "shapes": []}
    with JitMonitor() as monitor:
        if spec["mode"] == "warm":
            from warmplan.executor import run_plan

            started = time.perf_counter()
            run_plan(plan, worker, monitor=monitor)
            out["warmup_s"] = time.perf_counter() - started
            out["warmup_compiles"] = monitor.compiles()
        callers = [_caller(worker, shape, spec.get("call", "execute")) for shape in shapes]
        for i, shape in enumerate(shapes):
            call = callers[i]
            label = f"first[{i}]"
            primer = _primer(shapes, i) if spec.get("prime", True) else None
            if primer is not None:
                # One call of another, already measured shape right before the first
                # call, so that it meets the machine as busy as the steady calls do
                # (clocks up, caches hot): what is left between first and steady is then
                # the shape being new.
                with monitor.attribute(f"prime[{i}]"), worker.preserve_state():
                    _timed(worker, callers[primer])
            with monitor.attribute(label), worker.preserve_state():
                first = _timed(worker, call)
            # Steady calls run exactly as the first did (same state snapshot before each,
            # same monitor attribution), so the only difference is first vs not first:
            # the snapshot copies the KV caches, which evicts the CPU caches.
            steady = []
            for _ in range(spec["repeat"]):
                with monitor.attribute(f"steady[{i}]"), worker.preserve_state():
                    steady.append(_timed(worker, call))
            # The control for the first call: the same primer call, then the same call,
            # now not the first. first/switched is what being new costs the shape;
            # switched/steady is what coming after other work costs any call.
            switched = []
            for _ in range(spec["repeat"] // 2 if primer is not None else 0):
                assert primer is not None
                with monitor.attribute(f"prime[{i}]"), worker.preserve_state():
                    _timed(worker, callers[primer])
                with monitor.attribute(f"switched[{i}]"), worker.preserve_state():
                    switched.append(_timed(worker, call))
            out["shapes"].append(
                {
                    **shape,
                    "first_s": first,
                    "steady_s": statistics.median(steady) if steady else None,
                    "switched_s": statistics.median(switched) if switched else None,
                    "compiles": monitor.compiles(label),
                    "cache_loads": monitor.cache_loads(label),
                }
            )
        # The same calls after the server sat idle for a moment: a CPU's caches and
        # threads, a GPU's clocks, go cold within ~50 ms, which costs a sub-millisecond
        # call more than being a shape's first call after warmup does. In a pass of their
        # own, after every first call: a call right after an idle pause is slow for a
        # while, and would slow the next shape's first call down with it.
        for i, row in enumerate(out["shapes"]):
            idle = []
            for _ in range(spec["repeat"] // 2 if spec.get("pause", 0) > 0 else 0):
                time.sleep(spec["pause"])
                with monitor.attribute(f"idle[{i}]"), worker.preserve_state():
                    idle.append(_timed(worker, callers[i]))
            row["idle_s"] = statistics.median(idle) if idle else None
    return out


# -- in the parent ----------------------------------------------------------------------


def _run_child(
    spec: dict[str, Any], *, timeout_s: float, cache_dir: str | None = None
) -> dict[str, Any]:
    """One measurement process; its compile caches in ``cache_dir`` (default: empty, its own)."""
    with tempfile.TemporaryDirectory(prefix="warmplan-bench-") as own:
        tmp = cache_dir or own
        env = dict(os.environ)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton")
        env["PYTHONWARNINGS"] = "ignore"
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(
            f"first_request: a {spec['mode']} measurement failed (exit {proc.returncode})"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return ""
    return f"{a / b:.1f}x"


def _matches(shape: Shape, words: list[str]) -> bool:
    """Whether a WORD is the shape's label or step id, or (ending in ``*``) begins one."""
    names = (shape["label"], shape["step"])
    return any(
        n.startswith(w[:-1]) if w.endswith("*") else w in names for w in words for n in names
    )


def _progress(line: str) -> None:
    print(f"[first_request {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _warm_runs(
    base: dict[str, Any], shapes: list[Shape], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], float]:
    """``--warm-runs`` warm processes, one after another, sharing one compile-cache
    directory (the first starts it empty, the later ones load from it, as a restarted
    server does). Each shape's first call is the median over the runs (a first call
    happens once a process, and a GPU's call-to-call jitter is tens of percent at a few
    milliseconds); ``first_runs_s`` keeps every run's figure."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="warmplan-bench-warm-") as cache_dir:
        for i in range(args.warm_runs):
            run = _run_child(
                {**base, "mode": "warm", "shapes": shapes},
                timeout_s=args.timeout,
                cache_dir=cache_dir,
            )
            _progress(
                f"warm run {i + 1}/{args.warm_runs}: {len(shapes)} shapes measured after a "
                f"{run['warmup_s']:.1f}s warmup ({run['warmup_compiles']} compiles)"
            )
            for w in run["shapes"]:
                _progress(
                    f"  warm {w['label']}: first {_ms(w['first_s'])} ms, steady {_ms(w['steady_s'])} ms, "
                    f"switched {_ms(w.get('switched_s'))} ms, idle {_ms(w.get('idle_s'))} ms, {w['compiles']} compiles"
                )
            runs.append(run)
    merged = []
    for per_run in zip(*(r["shapes"] for r in runs), strict=True):

        def med(key: str, rows: tuple[dict[str, Any], ...] = per_run) -> float | None:
            values = [r[key] for r in rows if r.get(key) is not None]
            return statistics.median(values) if values else None

        merged.append(
            {
                **per_run[0],
                "first_s": med("first_s"),
                "steady_s": med("steady_s"),
                "idle_s": med("idle_s"),
                "switched_s": med("switched_s"),
                "first_runs_s": [r["first_s"] for r in per_run],
                "compiles": sum(r["compiles"] for r in per_run),
            }
        )
    return merged, runs[0]["warmup_s"]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    base = {
        "plan": str(args.plan),
        "device": args.device,
        "model_config": args.model_config,
        "repeat": args.repeat,
        "call": args.call,
        "pause": args.pause,
        "prime": args.prime,
    }
    list_spec = {**base, "mode": "cold", "repeat": 0, "shapes": None, "list_only": True}
    shapes: list[Shape] = _run_child(list_spec, timeout_s=args.timeout)["shapes"]
    if args.only:
        shapes = [s for s in shapes if _matches(s, args.only)]
        if not shapes:
            raise SystemExit(
                f"first_request: no shape's label or step id contains any of {args.only}"
            )
    if args.isolate:
        warm = [
            _run_child({**base, "mode": "warm", "shapes": [s]}, timeout_s=args.timeout)["shapes"][0]
            for s in shapes
        ]
        warmup_s = None
    else:
        warm, warmup_s = _warm_runs(base, shapes, args)
    cold: list[dict[str, Any] | None] = []
    for s in shapes:
        if args.cold_only is not None and not _matches(s, args.cold_only):
            cold.append(None)
            continue
        c = _run_child({**base, "mode": "cold", "shapes": [s]}, timeout_s=args.timeout)["shapes"][0]
        _progress(f"cold {s['label']}: {c['first_s'] * 1000:.1f} ms, {c['compiles']} compiles")
        cold.append(c)
    rows = []
    for s, w, c in zip(shapes, warm, cold, strict=True):
        steady = w["steady_s"] if w["steady_s"] is not None or c is None else c["steady_s"]
        c = c or {"first_s": None, "compiles": ""}
        rows.append(
            {
                "shape": s["label"],
                "step": s["step"],
                "cold_ms": _ms(c["first_s"]),
                "cold_compiles": c["compiles"],
                "warm_ms": _ms(w["first_s"]),
                "warm_compiles": w["compiles"],
                "steady_ms": _ms(steady),
                "idle_ms": _ms(w.get("idle_s")),
                "warm/idle": _ratio(w["first_s"], w.get("idle_s")),
                "switched_ms": _ms(w.get("switched_s")),
                "warm/switched": _ratio(w["first_s"], w.get("switched_s")),
                "warm/steady": _ratio(w["first_s"], steady),
                "cold/steady": _ratio(c["first_s"], steady),
                "_cold_s": c["first_s"],
                "_warm_s": w["first_s"],
                "_steady_s": steady,
            }
        )
    return {
        **base,
        "warm_runs": 1 if args.isolate else args.warm_runs,
        "warmup_s": warmup_s,
        "rows": rows,
    }


COLUMNS = [
    "shape",
    "cold_ms",
    "cold_compiles",
    "warm_ms",
    "warm_compiles",
    "steady_ms",
    "switched_ms",
    "idle_ms",
    "warm/steady",
    "warm/switched",
    "warm/idle",
    "cold/steady",
]


def render(result: dict[str, Any]) -> str:
    cells = [COLUMNS] + [[str(r[c]) for c in COLUMNS] for r in result["rows"]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i else cell.ljust(widths[i]) for i, cell in enumerate(row)
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (
        f"plan {result['plan']} on {result['device']}, steady = median of {result['repeat']} calls"
    )
    if result.get("warm_runs", 1) > 1:
        head += f", warm = median first call of {result['warm_runs']} warm processes"
    if result.get("warmup_s") is not None:
        head += f"; the plan ran in {result['warmup_s']:.2f}s"
    return head + "\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=str(ROOT / "plans" / "builtin-smoke.yaml"))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model-config", metavar="FILE")
    parser.add_argument(
        "--repeat", type=int, default=20, help="steady-state calls per shape (median)"
    )
    parser.add_argument(
        "--pause", type=float, default=0.2, help="idle seconds before each 'idle' call (0: none)"
    )
    parser.add_argument(
        "--call",
        choices=["execute", "step"],
        default="execute",
        help="execute: a serving batch of the shape; step: the step's own call",
    )
    parser.add_argument(
        "--prime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="call another (already measured) shape right before each first call, so that it meets a busy machine as the steady calls do",
    )
    parser.add_argument(
        "--warm-runs",
        type=int,
        default=1,
        metavar="N",
        help="warm processes (sharing a compile cache); first calls are their median",
    )
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="one fresh process per shape for the warm measurement too",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        metavar="WORD",
        help="measure only these shapes: a label ('uniform_decode 8') or step id, or a prefix ending in '*' ('uniform_decode*')",
    )
    parser.add_argument(
        "--cold-only",
        nargs="*",
        metavar="WORD",
        help="measure the cold first call only for these shapes (same syntax as --only); the others get warm, steady and idle only",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds per measurement process"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the numbers here")
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        if spec.get("list_only"):
            plan, worker = _make_worker(spec)
            print(json.dumps({"shapes": plan_shapes(plan, worker)}))
        else:
            print(json.dumps(child(spec)))
        return 0
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1: {args.repeat}")
    result = measure(args)
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
