"""What recording costs per batch: ``TraceRecorder.record_batch`` against a batch's run.

Times ``record_batch`` for typical batches (a decode batch, a mixed batch, a batch of
eight prefill chunks), written every time, sampled one in ten, rotating every 64 KiB,
and with a compile event attached (the rare case, flushed at once), each the median
over ``--repeat`` runs of ``--batches`` calls; then, unless ``--no-engine``, the
median time of the same batches executed on the built-in engine after its plan ran,
to put the recorder's cost beside a batch's.

    python bench/record_overhead.py [--device cpu|cuda] [--plan plans/builtin-smoke.yaml]
        [--batches 20000] [--repeat 5] [--no-engine] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from warmplan.monitor import CompileEvent  # noqa: E402 - after the sys.path line above
from warmplan.record import TraceRecorder  # noqa: E402
from warmplan.workers.base import Batch, PrefillChunk  # noqa: E402

BATCHES: dict[str, Batch] = {
    "decode 32": Batch(decode=32),
    "mixed 8 + 1 chunk": Batch(decode=8, prefill=(PrefillChunk(56, 1024),)),
    "8 chunks": Batch(prefill=tuple(PrefillChunk(64, 512 * i) for i in range(8))),
}
EVENT = CompileEvent(
    kind="dynamo",
    name="forward",
    key="input_ids=int64[64], positions=int64[64]",
    label="batch[0]",
    cache_hit=False,
    duration_s=0.8,
)


def _time_per_call(fn: Callable[[], object], calls: int, repeat: int) -> float:
    """Median seconds per call over ``repeat`` runs of ``calls`` calls."""
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - started) / calls)
    return statistics.median(runs)


def recorder_rows(batches: int, repeat: int, directory: Path) -> list[dict[str, Any]]:
    cases: list[tuple[str, dict[str, Any], bool]] = [
        ("every batch", {}, False),
        ("sample 1 in 10", {"sample_every": 10}, False),
        ("every batch, rotate at 64 KiB", {"max_bytes": 64 * 1024, "backups": 2}, False),
        ("every batch, with a compile event", {}, True),
    ]
    rows = []
    for shape, batch in BATCHES.items():
        for name, options, with_event in cases:
            path = directory / "rec.jsonl"
            recorder = TraceRecorder(path, **options)
            compiles = [EVENT] if with_event else []
            # A compile is rare; with one on every batch only a tenth of the calls run.
            calls = batches // 10 if with_event else batches
            per = _time_per_call(
                partial(recorder.record_batch, batch, compiles=compiles), calls, repeat
            )
            stats = recorder.stats
            recorder.close()
            rows.append(
                {
                    "batch": shape,
                    "recording": name,
                    "us_per_batch": per * 1e6,
                    "bytes_per_batch": stats.bytes_written / max(stats.batches_seen, 1),
                }
            )
    baseline = _time_per_call(lambda: None, batches, repeat)
    rows.append(
        {
            "batch": "-",
            "recording": "loop alone (subtracted from none)",
            "us_per_batch": baseline * 1e6,
            "bytes_per_batch": 0.0,
        }
    )
    return rows


def engine_ms(plan_path: str, device: str, repeat: int) -> dict[str, float]:
    """Median milliseconds of each batch of ``BATCHES`` on the built-in engine."""
    from warmplan.executor import run_plan
    from warmplan.log import configure
    from warmplan.plan import load_plan
    from warmplan.workers.builtin import build_worker

    configure("console", "warning")
    plan = load_plan(Path(plan_path))
    config = dict(plan.builtin)
    # Room for every batch above: 8 chunks of up to 3,648 cached tokens.
    config.update(
        max_num_tokens=512,
        max_num_batched_tokens=512,
        max_num_seqs=64,
        max_model_len=4096,
        num_blocks=2048,
    )
    worker = build_worker(config, device=device)
    run_plan(plan, worker)
    out = {}
    for shape, batch in BATCHES.items():
        worker.execute(batch)  # the first call compiles; not timed
        worker.synchronize()
        times = []
        for _ in range(max(repeat, 5)):
            started = time.perf_counter()
            worker.execute(batch)
            worker.synchronize()
            times.append(time.perf_counter() - started)
        out[shape] = statistics.median(times) * 1000
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=str(ROOT / "plans" / "builtin-smoke.yaml"))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--no-engine", action="store_true", help="skip timing the batches on the engine"
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory() as tmp:
        rows = recorder_rows(args.batches, args.repeat, Path(tmp))
    engine = {} if args.no_engine else engine_ms(args.plan, args.device, args.repeat)
    print(
        f"{'batch':<18}  {'recording':<34}  {'us/batch':>8}  {'bytes/batch':>11}  {'engine ms':>9}  {'overhead':>8}"
    )
    for row in rows:
        ms = engine.get(row["batch"])
        share = "" if ms is None else f"{row['us_per_batch'] / 1000 / ms * 100:.3f}%"
        print(
            f"{row['batch']:<18}  {row['recording']:<34}  {row['us_per_batch']:>8.2f}  "
            f"{row['bytes_per_batch']:>11.1f}  {'' if ms is None else f'{ms:.2f}':>9}  {share:>8}"
        )
        row["engine_ms"] = ms
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": args.device, "rows": rows}, indent=2), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
