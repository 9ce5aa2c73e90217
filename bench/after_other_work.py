"""Is a slow first call after warmup the shape being new, or the call following other work?

After the plan ran, in one process: many calls of one kind of work (slot mapping),
then a forward of a decode shape, three times over for the same shape: the first of
the three is that shape's first call after warmup, the others are not. If the
others cost as much, the extra time is the machine coming back to the forward's code
and data after other work (CPU caches, branch predictors, clocks), which no warmup
plan can remove; if only the first does, it is the shape being new.

    python bench/after_other_work.py [--plan plans/builtin-smoke.yaml] [--device cpu] [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=str(ROOT / "plans" / "builtin-smoke.yaml"))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--calls", type=int, default=200, help="slot-mapping calls before each forward"
    )
    parser.add_argument(
        "--decode", type=int, nargs="+", default=[1, 2, 4], help="decode batch sizes to try"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    from warmplan.executor import run_plan
    from warmplan.log import configure
    from warmplan.plan import load_plan
    from warmplan.workers.base import Batch
    from warmplan.workers.builtin import build_worker

    configure("console", "warning")
    plan = load_plan(Path(args.plan))
    config = dict(plan.builtin)
    if args.device == "auto":
        config.pop("device", None)
    worker = build_worker(config, device=args.device)
    started = time.perf_counter()
    run_plan(plan, worker)
    print(f"plan {args.plan} on {args.device}: ran in {time.perf_counter() - started:.1f}s")
    max_tokens = worker.limits.max_num_tokens

    def forward_ms(n: int) -> float:
        with worker.preserve_state():
            t = time.perf_counter()
            worker.execute(Batch(decode=n))
            worker.synchronize()
            return (time.perf_counter() - t) * 1000

    def other_work() -> None:
        for i in range(args.calls):
            with worker.preserve_state():
                worker.slot_mapping(1 + i % min(16, max_tokens))

    print(
        f"| decode | round | after {args.calls} slot-mapping calls ms | next call ms | back to back ms |"
    )
    print("| ---: | --- | ---: | ---: | ---: |")
    for n in args.decode:
        for round_ in ("first call of the shape", "again", "again"):
            other_work()
            after, nxt = forward_ms(n), forward_ms(n)
            steady = statistics.median(forward_ms(n) for _ in range(10))
            print(f"| {n} | {round_} | {after:.2f} | {nxt:.2f} | {steady:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
