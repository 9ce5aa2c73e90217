"""Key-based warmup against forward-based warmup of the same coverage (issue 14).

Two plans on the built-in engine, each in fresh processes on its own new cache root:

* ``forward`` - ``bench/plans/dsv4-forward.yaml``: dsv4 as it was, the engine's
  compile sizes warmed by dummy runs and the seed's 21-size slot-mapping fan run call
  by call;
* ``keys`` - ``plans/dsv4.yaml``: the same kernels by compile key (slot mapping,
  chunk metadata, the model's graph per compile size), compiled without a launch.

For each: ``cold`` (every cache empty), ``warm`` (the same command again, a restarted
worker), then ``warmplan verify --strict`` over the shipped traces and ``--unseen N``
random batch traces this script writes (seeded), in one more warm process: the
replay's compiles must be 0 for both plans. Prints a table (plan and process seconds,
compiles, keys) and, with ``--json``, writes every number.

    python bench/compile_keys.py                   # device auto
    python bench/compile_keys.py --device cpu --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PLANS = {
    "forward": REPO / "bench" / "plans" / "dsv4-forward.yaml",
    "keys": REPO / "plans" / "dsv4.yaml",
}
SHIPPED = [
    "chat.jsonl",
    "decode.jsonl",
    "long-prompt.jsonl",
    "requests-chat.jsonl",
    "requests-long-prompt.jsonl",
    "recorded-8192-chat.jsonl",
    "recorded-8192-long-prompt.jsonl",
]


def unseen_trace(path: Path, seed: int, batches: int = 40) -> None:
    """A random batch-level trace within the plan's limits (512 tokens, 64 sequences,
    4096 context): decodes, prefill chunks with and without prior context."""
    rng = random.Random(seed)
    lines = [f"# unseen: random batches, seed {seed}"]
    for _ in range(batches):
        decode = rng.choice([0, 1, 2, 3, rng.randint(1, 64)])
        budget = 512 - decode
        prefill = []
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            if budget < 2:
                break
            tokens = rng.randint(1, min(budget, 480))
            context = rng.choice([0, 0, rng.randint(1, 2000)])
            prefill.append({"tokens": tokens, "context": context})
            budget -= tokens
        if not decode and not prefill:
            decode = 1
        entry: dict[str, Any] = {"decode": decode}
        if prefill:
            entry["prefill"] = prefill
        lines.append(json.dumps(entry))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, proc


def measure(name: str, device: str, traces: list[str], root: Path) -> dict[str, Any]:
    env = {**os.environ, "WARMPLAN_CACHE_ROOT": str(root)}
    warmplan = [sys.executable, "-m", "warmplan"]
    out: dict[str, Any] = {"plan": str(PLANS[name].relative_to(REPO))}
    for phase in ("cold", "warm"):
        report = root / f"{phase}.json"
        wall, proc = run(
            [*warmplan, "run", str(PLANS[name]), "--device", device, "--report", str(report)], env
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name} {phase}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        data = json.loads(report.read_text())
        keys = [k for s in data["steps"] for k in ((s.get("keys") or {}).get("kernels") or [])]
        out[phase] = {
            "process_s": round(wall, 3),
            "plan_s": data["totals"]["duration_s"],
            "compiles": data["totals"]["compiles"],
            "cache_loads": data["totals"]["cache_loads"],
            "steps": {
                s["id"]: round(s["duration_s"], 3) for s in data["steps"] if s["skipped"] is None
            },
            "keys": {
                k["kernel"]: {x: k[x] for x in ("cases", "keys", "compiled", "loaded", "present")}
                for k in keys
            },
        }
    args = [*warmplan, "verify", str(PLANS[name]), "--device", device, "--strict", "--json"]
    for t in traces:
        args += ["--trace", t]
    wall, proc = run(args, env)
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"{name} verify: exit {proc.returncode}\n{proc.stderr[-3000:]}") from None
    results = result.get("traces", [result])
    replay = [r["replay"] for r in results]
    out["verify"] = {
        "exit": proc.returncode,
        "process_s": round(wall, 3),
        "replay_compiles": sum(r["compiles"] for r in replay),
        "replay_cache_loads": sum(r["cache_loads"] for r in replay),
        "replay_device_loads": sum(r["device_loads"] or 0 for r in replay),
        "per_trace": {
            Path(r["trace"]).name: [x["compiles"], x["cache_loads"], x["device_loads"]]
            for r, x in zip(results, replay, strict=True)
        },
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--unseen", type=int, default=2, help="random traces to add (seeded)")
    ap.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="warmplan-keys-"))
    traces = [str(REPO / "traces" / t) for t in SHIPPED]
    for i in range(args.unseen):
        path = work / f"unseen-{i}.jsonl"
        unseen_trace(path, seed=1400 + i)
        traces.append(str(path))
    results: dict[str, Any] = {
        "device": args.device,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import torch

        results["torch"] = torch.__version__
        results["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    try:
        for name in args.plans:
            root = work / name
            root.mkdir()
            print(f"[{name}] cold, warm, verify ...", flush=True)
            results[name] = measure(name, args.device, traces, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{results.get('card')} torch {results.get('torch')} {results['date']}")
    print(
        f"{'plan':8} {'cold plan s':>11} {'cold proc s':>11} {'warm plan s':>11} {'warm proc s':>11} "
        f"{'cold compiles':>13} {'replay compiles':>15}"
    )
    for name in args.plans:
        r = results[name]
        print(
            f"{name:8} {r['cold']['plan_s']:>11.2f} {r['cold']['process_s']:>11.2f} "
            f"{r['warm']['plan_s']:>11.2f} {r['warm']['process_s']:>11.2f} "
            f"{r['cold']['compiles']:>13} {r['verify']['replay_compiles']:>15}"
        )
    if "forward" in results and "keys" in results:
        f, k = results["forward"], results["keys"]
        print(
            f"keys / forward: cold plan {k['cold']['plan_s'] / f['cold']['plan_s']:.2f}x, "
            f"warm plan {k['warm']['plan_s'] / f['warm']['plan_s']:.2f}x"
        )
    for name in args.plans:
        print(f"\n[{name}] steps (cold s / warm s):")
        r = results[name]
        for sid, cold_s in r["cold"]["steps"].items():
            print(f"  {sid:28} {cold_s:>8.2f} {r['warm']['steps'].get(sid, 0):>8.2f}")
        if r["cold"]["keys"]:
            print(f"  keys cold: {r['cold']['keys']}")
            print(f"  keys warm: {r['warm']['keys']}")
        print(f"  verify: {r['verify']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    bad = [
        n
        for n in args.plans
        if results[n]["verify"]["replay_compiles"] or results[n]["verify"]["exit"]
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
