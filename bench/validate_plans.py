"""How long validation takes: N plans of M steps each, loaded and validated in one
process, as `warmplan validate` does. Prints a table.

    python bench/validate_plans.py [--plans 100] [--steps 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_plan(index: int, steps: int) -> str:
    lines = [
        "# yaml-language-server: $schema=../schemas/plan.schema.json",
        "version: 1",
        f"name: bench-{index}",
        "steps:",
    ]
    kinds = ["slot_mapping", "dummy_run", "dummy_run_ctx", "autotune"]
    for i in range(steps):
        kind = kinds[i % len(kinds)]
        if kind == "slot_mapping":
            lines += [
                f"  - id: fan-{i}",
                "    kind: slot_mapping",
                "    tokens: [{range: [1, 16]}, 32, {powers_of_two: [64, 512]}]",
                "    when: {platform: cuda, env: {name: WARM, unset: true}}",
            ]
        elif kind == "dummy_run":
            lines += [
                f"  - id: run-{i}",
                "    kind: dummy_run",
                "    shape: mixed",
                f"    tokens: {16 + i}",
                "    force_attention: true",
            ]
        elif kind == "dummy_run_ctx":
            lines += [
                f"  - id: chunk-{i}",
                "    kind: dummy_run",
                "    shape: single_prefill",
                "    tokens: max_num_batched_tokens",
                "    prior_context: same",
            ]
        else:
            lines += [
                f"  - id: tune-{i}",
                "    kind: autotune",
                "    backend: builtin",
                "    run: {shape: plain, tokens: max_num_batched_tokens}",
                "    cache: {policy: leader, timeout_s: 60}",
                "    when: {device_capability: '9.0', flag: {enable_flashinfer_autotune: [true, unset]}}",
            ]
    return "\n".join(lines) + "\n"


def make_flow_plan(index: int, steps: int) -> str:
    lines = [
        "# yaml-language-server: $schema=../schemas/plan.schema.json",
        "version: 1",
        f"name: bench-{index}",
        "steps:",
    ]
    for i in range(steps):
        lines.append(
            [
                f"  - {{id: fan-{i}, kind: slot_mapping, tokens: [{{range: [1, 16]}}, 32, {{powers_of_two: [64, 512]}}], when: {{platform: cuda}}}}",
                f"  - {{id: run-{i}, kind: dummy_run, shape: mixed, tokens: {16 + i}, force_attention: true}}",
                f"  - {{id: chunk-{i}, kind: dummy_run, shape: single_prefill, tokens: max_num_batched_tokens, prior_context: same}}",
                f"  - {{id: tune-{i}, kind: autotune, backend: builtin, run: {{shape: plain, tokens: max_num_batched_tokens}}, cache: {{policy: leader}}}}",
            ][i % 4]
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--plans", type=int, default=100)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--style",
        choices=["block", "flow"],
        default="block",
        help="block: one key a line; flow: one step a line",
    )
    ap.add_argument(
        "--jobs", type=int, default=None, help="as warmplan validate -j (default: CPU count)"
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    from warmplan.plan import check_files

    import_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.plans):
            p = Path(tmp) / f"plan-{i}.yaml"
            p.write_text(
                make_plan(i, args.steps) if args.style == "block" else make_flow_plan(i, args.steps)
            )
            paths.append(str(p))
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            results = check_files(paths, jobs=args.jobs)
            times.append(time.perf_counter() - t)
            bad = [r for r in results if r.problems]
            assert not bad, bad[0]
        size = sum(Path(p).stat().st_size for p in paths) // len(paths)
    print(
        f"python {platform.python_version()} on {platform.machine()} ({os.cpu_count()} cores), {args.plans} plans x {args.steps} steps, {args.style} style, {size} bytes a plan"
    )
    print(f"{'what':<28} {'seconds':>8}")
    print(f"{'import warmplan.plan':<28} {import_s:>8.3f}")
    print(f"{'validate all (median)':<28} {statistics.median(times):>8.3f}")
    print(f"{'validate all (min)':<28} {min(times):>8.3f}")
    print(f"{'per plan (median, ms)':<28} {1000 * statistics.median(times) / args.plans:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
