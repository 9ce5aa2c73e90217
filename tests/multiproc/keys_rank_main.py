"""One rank of a split ``compile_keys`` warmup (run as a script, like ``rank_main.py``).

Reads its job from ``WP_JOB`` (JSON: ``plan``, the plan's text; ``serve``, batches
of ``(tokens, context, is_decode)`` to run after the plan; ``slots``, token counts
to run the slot mapping at after it; ``out``), joins the world
from the launcher's env, builds the built-in engine on ``WARMPLAN_CACHE_ROOT`` (CPU),
runs the plan, then serves the batches under a JIT monitor, and writes
``<out>/outcome.rank<R>.json``: each keys step's report, the plan's compiles and
seconds, and the serving compiles. A ``StepError`` prints ``ERROR <message>`` on
stderr and exits with its code (2).

``WP_KEYS_FAIL=1`` in a rank's env: its first compile raises (a rank whose share
fails). Also used by ``bench/compile_keys_split.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from warmplan.errors import StepError  # noqa: E402
from warmplan.world import current_world  # noqa: E402


def main() -> int:
    job = json.loads(os.environ["WP_JOB"])
    out = job["out"]
    start = time.perf_counter()
    world = current_world(timeout_s=float(job.get("timeout_s", 120)))
    rank = world.rank

    from warmplan.executor import run_plan
    from warmplan.monitor import JitMonitor
    from warmplan.plan import parse_plan
    from warmplan.workers.builtin import build_worker

    plan = parse_plan(job["plan"], file="keys.yaml")
    worker = build_worker(dict(plan.builtin or {}), device="cpu", world=world)
    if os.environ.get("WP_KEYS_FAIL") == "1":

        def failing(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected compile failure")

        worker.compile = failing  # type: ignore[method-assign]
    setup_s = time.perf_counter() - start
    try:
        report = run_plan(plan, worker)
    except StepError as exc:
        print(f"ELAPSED {time.perf_counter() - start:.3f}", file=sys.stderr)
        print(f"ERROR {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    serve_compiles = 0
    events: list[str] = []
    if job.get("serve") or job.get("slots"):
        with JitMonitor() as monitor, monitor.attribute("serve"):
            for n in job.get("slots") or []:
                worker.slot_mapping(int(n))
            for specs in job.get("serve") or []:
                worker.runner.run_requests([tuple(s) for s in specs])
        serve_compiles = monitor.compiles("serve")
        events = [str(e) for e in monitor.events][:20]
    result = {
        "rank": rank,
        "setup_s": round(setup_s, 3),
        "plan_s": round(report.duration_s, 3),
        "compiles": report.totals["compiles"],
        "steps": {
            s.id: {"keys": s.keys, "compiles": s.compiles, "duration_s": s.duration_s}
            for s in report.steps
        },
        "serve_compiles": serve_compiles,
        "serve_events": events,
    }
    with open(os.path.join(out, f"outcome.rank{rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
