"""Warm restarts: what a restarted worker pays, cold against warm, and where it goes.

Runs ``warmplan run PLAN`` in fresh processes on one cache root (issue 13):

* ``cold`` - every cache empty: inductor, Triton, FlashInfer and warmplan's own
  (autotune files, the built-in engine's AOT artefacts), all under one new root;
* ``warm`` - the same command again, on the caches the cold run left (a restarted
  worker); with ``--warm-runs N``, N of them one after another;
* with ``--verify TRACE...``: ``warmplan verify PLAN --strict --trace ...`` in one more
  fresh process on the same caches (the warm start's proof: no compile while replaying).

Each process is timed from the parent (spawn to exit: the whole process) and from
inside, by phase: interpreter start-up, imports (warmplan, torch, torch's compiler
stack, Triton, FlashInfer), device start-up, the engine build, the plan (each step),
exit. Inside each step the time is split, exclusively (nested timers subtracted),
into: dynamo tracing (``convert_frame._compile`` less its backend), the backend
(AOTAutograd + inductor: cache look-up and load, or the compile), AOT artefact
look-up + load, AOT compile + save, AOT guard evaluation, Triton autotune
benchmarking, Triton compile or cache look-up + load, Triton module load + launcher
set-up, and the rest (the run itself, eager Python, and dynamo's own guard
evaluation, which has no hook to time it by).

    python bench/warm_restart.py                       # plans/dsv4.yaml, device auto
    python bench/warm_restart.py --device cpu --warm-runs 2 --json out.json
    python bench/warm_restart.py --verify traces/chat.jsonl traces/long-prompt.jsonl

``--root DIR`` keeps the caches (default: a new temporary directory, removed after);
``--no-aot`` runs the engine without AOT artefacts (``WARMPLAN_AOT=0``), the JIT path
with warm disk caches, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = (
    ("trace", "dynamo trace"),
    ("backend", "backend look-up/load/compile"),
    ("aot_load", "AOT look-up + load"),
    ("aot_compile", "AOT compile + save"),
    ("aot_guard", "AOT guards"),
    ("triton_autotune", "Triton autotune"),
    ("triton_compile", "Triton compile/look-up"),
    ("triton_launcher", "Triton load + launcher"),
    ("rest", "run + rest"),
)


# ---------------------------------------------------------------- the child


class Timers:
    """Exclusive time per category: a timer nested in another is subtracted from it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, nested seconds]

    @contextlib.contextmanager
    def time(self, category: str) -> Iterator[None]:
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[0]
            self.totals[category] = self.totals.get(category, 0.0) + elapsed - frame[1]
            if self._stack:
                self._stack[-1][1] += elapsed

    def wrap(self, owner: Any, attr: str, category: str) -> None:
        """Time every call of ``owner.attr`` under ``category`` (skipped when absent)."""
        original = getattr(owner, attr, None)
        if original is None:
            return
        timers = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            with timers.time(category):
                return original(*args, **kwargs)

        if isinstance(owner, type) and isinstance(owner.__dict__.get(attr), classmethod):
            setattr(owner, attr, classmethod(lambda cls, *a, **k: timed(*a, **k)))
            return
        setattr(owner, attr, timed)


def _child(out: str, argv: list[str]) -> int:
    t_start = time.perf_counter()
    wall_start = time.time()
    phases: dict[str, float] = {}
    timers = Timers()

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

    import importlib

    phase("import warmplan", lambda: importlib.import_module("warmplan.cli"))
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    torch = phase("import torch", lambda: importlib.import_module("torch"))
    device = _arg(argv, "--device", "auto")
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        phase("device start-up", lambda: _cuda_start(torch))
        phase("import triton", lambda: importlib.import_module("triton"))
    if cuda and importlib.util.find_spec("flashinfer") is not None:
        phase("import flashinfer", lambda: importlib.import_module("flashinfer"))
    phase("import torch._dynamo", lambda: _import_compiler(importlib))

    import warmplan.workers.builtin as builtin
    from warmplan.workers.builtin import aot

    convert_frame = importlib.import_module("torch._dynamo.convert_frame")
    output_graph = importlib.import_module("torch._dynamo.output_graph")
    timers.wrap(convert_frame, "_compile", "trace")
    timers.wrap(output_graph.OutputGraph, "call_user_compiler", "backend")
    timers.wrap(aot.AotStore, "_load", "aot_load")
    timers.wrap(aot.AotStore, "get", "aot_compile")
    if cuda:
        autotuner = importlib.import_module("triton.runtime.autotuner")
        compiler = importlib.import_module("triton.compiler.compiler")
        jit = importlib.import_module("triton.runtime.jit")
        timers.wrap(autotuner.Autotuner, "_bench", "triton_autotune")
        timers.wrap(compiler, "compile", "triton_compile")
        if getattr(jit, "compile", None) is compiler.compile:
            timers.wrap(jit, "compile", "triton_compile")
        timers.wrap(compiler.CompiledKernel, "_init_handles", "triton_launcher")

    workers: list[Any] = []
    build_imports: list[str] = []
    original_build = builtin.build_worker

    def build(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        before = set(sys.modules)
        worker = original_build(*args, **kwargs)
        phases["engine build"] = time.perf_counter() - start
        imported = sorted(set(sys.modules) - before)
        build_imports.extend(m for m in imported if m.count(".") <= 2)
        workers.append(worker)
        return worker

    builtin.build_worker = build
    steps: list[dict[str, Any]] = []
    executor = importlib.import_module("warmplan.executor")
    original_run_one = executor._run_one

    def run_one(index: int, total: int, rstep: Any, *args: Any, **kwargs: Any) -> Any:
        before = dict(timers.totals)
        stats = _aot_stats(workers)
        start = time.perf_counter()
        try:
            return original_run_one(index, total, rstep, *args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            split = {k: v - before.get(k, 0.0) for k, v in timers.totals.items()}
            split = {k: v for k, v in split.items() if v > 0}
            after = _aot_stats(workers)
            split["aot_guard"] = after.get("guard_s", 0.0) - stats.get("guard_s", 0.0)
            split["rest"] = seconds - sum(split.values())
            steps.append({"id": rstep.id, "seconds": seconds, "split": split})

    setattr(executor, "_run_one", run_one)  # noqa: B010  # the executor calls it by name
    from warmplan.cli import main

    main_start = time.perf_counter()
    sys.argv = ["warmplan", *argv]  # as the program: main() reads sys.argv
    rc = main()
    main_s = time.perf_counter() - main_start
    report = {}
    path = _arg(argv, "--report", None)
    if path and os.path.exists(path):
        report = json.loads(Path(path).read_text())
    phases["plan"] = float(report.get("totals", {}).get("duration_s", 0.0))
    phases["CLI: preflight, report, table"] = (
        main_s - phases["plan"] - phases.get("engine build", 0.0)
    )
    result = {
        "rc": rc,
        "wall_start": wall_start,
        "inside_s": time.perf_counter() - t_start,
        "phases": phases,
        "steps": steps,
        "report_totals": report.get("totals", {}),
        "report_steps": [
            {k: s.get(k) for k in ("id", "duration_s", "compiles", "cache_loads", "skipped")}
            for s in report.get("steps", [])
        ],
        "worker": report.get("worker", {}),
        "aot": _aot_stats(workers),
        "build_imports": build_imports,
        "aot_notes": [n for w in workers for n in (w.runner.aot.notes if w.runner.aot else [])],
    }
    Path(out).write_text(json.dumps(result, indent=1))
    sys.stdout.flush()
    return rc


def _cuda_start(torch: Any) -> None:
    torch.cuda.init()
    torch.empty(1, device="cuda").add_(1)
    torch.cuda.synchronize()


def _import_compiler(importlib: Any) -> None:
    # Only what every run imports (the engine's torch.compile objects); inductor's
    # modules are imported by the first compile or AOT load and counted there.
    importlib.import_module("torch._dynamo")


def _aot_stats(workers: list[Any]) -> dict[str, float]:
    import dataclasses

    out: dict[str, float] = {}
    for w in workers:
        if w.runner.aot is not None:
            for k, v in dataclasses.asdict(w.runner.aot.stats).items():
                out[k] = out.get(k, 0) + v
    return out


def _arg(argv: list[str], name: str, default: str | None) -> str | None:
    if name in argv:
        return argv[argv.index(name) + 1]
    return default


# ---------------------------------------------------------------- the parent


def _spawn(label: str, cli: list[str], env: dict[str, str], tmp: Path) -> dict[str, Any]:
    out = tmp / f"{label}.json"
    spawned = time.time()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(out), "--", *cli],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    result: dict[str, Any] = (
        json.loads(out.read_text()) if out.exists() else {"rc": proc.returncode}
    )
    result["process_s"] = wall
    result["exit_code"] = proc.returncode
    result["stdout"] = proc.stdout
    result["stderr_tail"] = proc.stderr[-3000:]
    if "wall_start" in result:
        result["phases"] = {
            "interpreter start-up": result["wall_start"] - spawned,
            **result["phases"],
        }
        result["phases"]["exit"] = (
            wall - result["phases"]["interpreter start-up"] - result["inside_s"]
        )
    return result


def _versions() -> dict[str, str | None]:
    code = (
        "import json,platform,torch,importlib.util as u\n"
        "v={'python':platform.python_version(),'torch':torch.__version__}\n"
        "for m in ('triton','flashinfer'):\n"
        "    v[m]=__import__(m).__version__ if u.find_spec(m) else None\n"
        "v['gpu']=torch.cuda.get_device_name() if torch.cuda.is_available() else None\n"
        "v['cpus']=str(__import__('os').cpu_count())\n"
        "print(json.dumps(v))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        parsed: dict[str, str | None] = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        parsed = {"error": out.stderr[-500:]}
    return parsed


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _summary(runs: dict[str, dict[str, Any]]) -> str:
    labels = list(runs)
    cold = runs.get("cold", {})
    names: list[str] = []
    for r in runs.values():
        for k in r.get("phases", {}):
            if k not in names:
                names.append(k)
    out = []
    rows = [["phase (s)", *labels]]
    for name in names:
        rows.append([name, *(_fmt(runs[lb].get("phases", {}).get(name)) for lb in labels)])
    rows.append(["whole process", *(_fmt(runs[lb].get("process_s")) for lb in labels)])
    rows.append(
        [
            "plan (report total)",
            *(_fmt(runs[lb].get("report_totals", {}).get("duration_s")) for lb in labels),
        ]
    )
    rows.append(
        ["compiles", *(str(runs[lb].get("report_totals", {}).get("compiles", "")) for lb in labels)]
    )
    rows.append(
        [
            "disk-cache loads",
            *(str(runs[lb].get("report_totals", {}).get("cache_loads", "")) for lb in labels),
        ]
    )
    out.append(_table(rows))
    for lb in labels[1:]:
        run = runs[lb]
        plan_c = cold.get("report_totals", {}).get("duration_s")
        plan_w = run.get("report_totals", {}).get("duration_s")
        if plan_c and plan_w is not None:
            out.append(
                f"{lb}: plan {plan_w:.2f} s = {100 * plan_w / plan_c:.1f} % of cold (target <= 10 %); "
                f"process {run['process_s']:.2f} s = {100 * run['process_s'] / cold['process_s']:.1f} % "
                "of cold (target <= 20 %)"
            )
    for lb in labels:
        steps = runs[lb].get("steps", [])
        if not steps:
            continue
        out.append(f"\n{lb}: where each step's time went (s, exclusive)")
        rows = [["step", "total", *(c[1] for c in CATEGORIES)]]
        for s in steps:
            rows.append(
                [
                    s["id"],
                    _fmt(s["seconds"]),
                    *(_fmt(s["split"].get(c[0]) or None) for c in CATEGORIES),
                ]
            )
        totals = {c[0]: sum(s["split"].get(c[0], 0.0) for s in steps) for c in CATEGORIES}
        rows.append(
            [
                "all steps",
                _fmt(sum(s["seconds"] for s in steps)),
                *(_fmt(totals[c[0]]) for c in CATEGORIES),
            ]
        )
        out.append(_table(rows))
        notes = runs[lb].get("aot_notes") or []
        for note in notes:
            out.append(f"  note: {note}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        out, rest = argv[1], argv[3:]
        return _child(out, rest)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--plan", default="plans/dsv4.yaml")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--warm-runs", type=int, default=1)
    p.add_argument("--root", help="cache root to use and keep (default: a new temporary one)")
    p.add_argument("--no-aot", action="store_true", help="JIT path only (WARMPLAN_AOT=0)")
    p.add_argument(
        "--verify", nargs="+", metavar="TRACE", help="verify --strict on these traces, warm"
    )
    p.add_argument("--json", metavar="FILE", help="write every measurement here")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="warm-restart-"))
    root = Path(args.root) if args.root else tmp / "cache"
    env = dict(os.environ)
    env.update(
        WARMPLAN_CACHE_ROOT=str(root),
        TORCHINDUCTOR_CACHE_DIR=str(root / "inductor"),
        TRITON_CACHE_DIR=str(root / "triton"),
        FLASHINFER_WORKSPACE_BASE=str(root / "flashinfer"),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    if args.no_aot:
        env["WARMPLAN_AOT"] = "0"
    versions = _versions()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(
        f"warm_restart {args.plan} device={args.device} {started} {json.dumps(versions)}",
        flush=True,
    )
    runs: dict[str, dict[str, Any]] = {}
    labels = ["cold"] + [
        f"warm{i + 1}" if args.warm_runs > 1 else "warm" for i in range(args.warm_runs)
    ]
    try:
        for label in labels:
            cli = [
                "run",
                args.plan,
                "--device",
                args.device,
                "--no-progress",
                "--report",
                str(tmp / f"{label}-report.json"),
            ]
            runs[label] = _spawn(label, cli, env, tmp)
            r = runs[label]
            print(
                f"{label}: exit {r['exit_code']}, process {r['process_s']:.2f} s, plan "
                f"{r.get('report_totals', {}).get('duration_s', float('nan')):.2f} s, "
                f"{r.get('report_totals', {}).get('compiles')} compiles",
                flush=True,
            )
            if r["exit_code"] != 0:
                print(r["stderr_tail"], file=sys.stderr)
        verify: dict[str, Any] | None = None
        if args.verify:
            cmd = [
                sys.executable,
                "-m",
                "warmplan",
                "verify",
                args.plan,
                "--device",
                args.device,
                "--strict",
            ]
            for t in args.verify:
                cmd += ["--trace", t]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            verify = {
                "exit_code": proc.returncode,
                "process_s": time.perf_counter() - start,
                "stdout": proc.stdout[-4000:],
                "stderr": proc.stderr[-2000:],
            }
        print()
        print(runs["cold"].get("stdout", "")[-3000:])
        print(_summary(runs))
        if verify is not None:
            print(
                f"\nverify --strict (warm start, {verify['process_s']:.1f} s): exit {verify['exit_code']}"
            )
            print(verify["stdout"][-2500:])
            if verify["exit_code"]:
                print(verify["stderr"], file=sys.stderr)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "plan": args.plan,
                        "started": started,
                        "versions": versions,
                        "runs": runs,
                        "verify": verify,
                    },
                    indent=1,
                )
            )
    finally:
        if not args.root:
            shutil.rmtree(tmp, ignore_errors=True)
    ok = all(r["exit_code"] == 0 for r in runs.values()) and (
        verify is None or verify["exit_code"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
