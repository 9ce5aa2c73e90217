"""Compile keys split across ranks against every rank compiling every key (issue 14).

Two real ranks (torchrun-style env, gloo on CPU), the built-in engine, a plan of
``compile_keys`` steps: the slot-mapping keys, the chunk-metadata keys and the
model's graph at every compile size. Each configuration is a fresh launch on fresh
cache roots (one per rank: inductor's, Triton's and the AOT store all cold, so the
exchange really moves files):

* ``split`` - ``split: auto``: each rank compiles its share, the ranks exchange the
  files (``warmplan.world.exchange``), each loads the rest;
* ``none`` - ``split: none``: every rank compiles every key.

After the plan each rank serves the covered shapes under the JIT monitor in the same
process: its compiles must be 0 on both ranks. The plan time is the slowest rank's
``run_plan`` (imports and engine setup apart). Prints a table and, with ``--json``,
writes every number.

    python bench/compile_keys_split.py                  # the tiny engine (2 sizes)
    python bench/compile_keys_split.py --engine dsv4    # dsv4's 10 sizes (long on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RANK_MAIN = REPO / "tests" / "multiproc" / "keys_rank_main.py"

TINY = {
    "preset": "sparse-mla",
    "num_layers": 1,
    "hidden_size": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "vocab_size": 128,
    "block_size": 4,
    "num_blocks": 96,
    "max_model_len": 160,
    "max_num_tokens": 16,
    "max_num_batched_tokens": 16,
    "max_num_seqs": 8,
    "compile_sizes": [4, 16],
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "index_topk": 8,
    "index_head_dim": 16,
    "index_num_heads": 2,
    "dtype": "float32",
}
# plans/dsv4.yaml's engine.
DSV4 = {
    "preset": "sparse-mla",
    "max_num_tokens": 512,
    "max_num_batched_tokens": 512,
    "max_num_seqs": 64,
    "max_model_len": 4096,
    "compile_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
}
ENGINES = {"tiny": TINY, "dsv4": DSV4}


def plan_text(engine: dict[str, Any], split: str) -> str:
    steps = [("slot", "slot_mapping"), ("chunk", "chunk_metadata"), ("forward", "forward")]
    lines = ["version: 1", f"name: keys-{split}", f"builtin: {json.dumps(engine)}", "steps:"]
    for sid, kernel in steps:
        lines.append(f"  - {{id: {sid}, kind: compile_keys, kernel: {kernel}, split: {split}}}")
    return "\n".join(lines) + "\n"


def serve_batches(engine: dict[str, Any]) -> list[list[list[Any]]]:
    """Decodes and prefill chunks (with and without prior context) at every compile size."""
    out = []
    for size in engine["compile_sizes"]:
        out.append([[1, 5, True]] * min(size, engine["max_num_seqs"]))
        out.append([[size, 0, False]])
        if size > 1:
            out.append([[size - 1, 8, False]])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(n: int, job: dict[str, Any], work: Path, timeout_s: float) -> dict[str, Any]:
    port = free_port()
    procs = []
    start = time.perf_counter()
    for rank in range(n):
        root = work / f"root{rank}"
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(n),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(n),
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "WARMPLAN_CACHE_ROOT": str(root),
            "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
            "TRITON_CACHE_DIR": str(root / "triton"),
            "WP_JOB": json.dumps({**job, "out": str(work), "timeout_s": timeout_s}),
        }
        err = open(work / f"stderr.rank{rank}", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, str(RANK_MAIN)], env=env, stderr=err), err))
    for p, err in procs:
        p.wait(timeout=timeout_s)
        err.close()
    wall = time.perf_counter() - start
    ranks = []
    for rank, (p, _) in enumerate(procs):
        path = work / f"outcome.rank{rank}.json"
        if p.returncode != 0 or not path.exists():
            tail = (work / f"stderr.rank{rank}").read_text()[-3000:]
            raise SystemExit(f"rank {rank} exited {p.returncode}:\n{tail}")
        ranks.append(json.loads(path.read_text()))
    return {"wall_s": round(wall, 3), "ranks": ranks}


def summary(run: dict[str, Any]) -> dict[str, Any]:
    ranks = run["ranks"]
    splits = [s["keys"]["split"] for o in ranks for s in o["steps"].values() if s["keys"]]
    outcomes: dict[str, int] = {}
    for o in ranks:
        for s in o["steps"].values():
            for k in (s["keys"] or {}).get("keys", []):
                outcomes[k["outcome"]] = outcomes.get(k["outcome"], 0) + 1
    return {
        "plan_s": max(o["plan_s"] for o in ranks),
        "plan_s_per_rank": [o["plan_s"] for o in ranks],
        "wall_s": run["wall_s"],
        "keys": sum(len(s["keys"]["keys"]) for s in ranks[0]["steps"].values() if s["keys"]),
        "outcomes_both_ranks": outcomes,
        "exchange_s": round(max((s["exchange_s"] for s in splits if s), default=0.0), 3),
        "bytes": sum(s["bytes"] for s in splits if s) // max(1, len(ranks)),
        "files_received": sum(s["files_received"] for s in splits if s),
        "serve_compiles": [o["serve_compiles"] for o in ranks],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="tiny", choices=list(ENGINES))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    import torch

    engine = ENGINES[args.engine]
    results: dict[str, Any] = {
        "engine": args.engine,
        "ranks": args.ranks,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for split in ("auto", "none"):
        work = Path(tempfile.mkdtemp(prefix=f"warmplan-split-{split}-"))
        try:
            print(f"[split: {split}] cold, {args.ranks} ranks ...", flush=True)
            job = {"plan": plan_text(engine, split), "serve": serve_batches(engine)}
            results[split] = summary(launch(args.ranks, job, work, args.timeout))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    a, b = results["auto"], results["none"]
    print(
        f"\n{args.engine} engine, {args.ranks} ranks (gloo), {results['cpus']} CPUs, "
        f"torch {results['torch']}, {results['date']}"
    )
    print(
        f"{'keys':>4} {'cold split s':>12} {'cold none s':>11} {'speed-up':>8} "
        f"{'exchange s':>10} {'bytes exchanged':>15} {'serve compiles':>14}"
    )
    print(
        f"{a['keys']:>4} {a['plan_s']:>12.2f} {b['plan_s']:>11.2f} "
        f"{b['plan_s'] / a['plan_s']:>7.2f}x {a['exchange_s']:>10.3f} {a['bytes']:>15} "
        f"{a['serve_compiles'] + b['serve_compiles']!s:>14}"
    )
    print(f"split: {json.dumps(a)}\nnone:  {json.dumps(b)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 1 if any(a["serve_compiles"] + b["serve_compiles"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
