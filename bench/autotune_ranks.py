"""Autotune across ranks: how long the autotune step takes for 1, 2 and 4 ranks under
the leader and every_rank policies (and together, for FlashInfer-shaped backends),
with a cold and a warm cache, for one or more of the built-in engine's backends
(``builtin`` on CPU with gloo; ``builtin``, ``triton`` and ``flashinfer`` on CUDA
with NCCL, one GPU a rank), or ``fakefi`` (the FlashInfer-shaped fake tuner of
``tests/fakes/fakefi`` on CPU: the protocol's and the timing reduction's own cost,
hybrid buckets up to the tokens); and how long a follower's warmup takes with and
without shared compile caches.

    python bench/autotune_ranks.py [--ranks 1 2 4] [--tokens 256] [--skip-compile] [--json]
    python bench/autotune_ranks.py --device cuda --ranks 1 --backend builtin triton flashinfer
    python bench/autotune_ranks.py --backend fakefi --ranks 1 2 --skip-compile

Each configuration is a fresh launch of N processes (torchrun-style env, gloo). The
step time is the slowest rank's ``run_autotune`` wall time (world setup and imports
excluded, and one untimed forward at 1 token first). The autotune runs use ``compile=False`` (eager forward: the step's cost is
then tuning, file I/O and collectives, not torch.compile); the compile-cache runs use
``compile=True`` with 2 ranks and one dummy-run shape.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# -- one rank -------------------------------------------------------------------------


def rank_main(job: dict[str, Any]) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    import structlog

    from warmplan.steps.autotune import ResolvedAutotune, run_autotune
    from warmplan.workers.builtin.worker import BuiltinWorker
    from warmplan.world import current_world

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    log = structlog.get_logger("bench")
    world = current_world(timeout_s=600)
    passes: tuple[Any, ...] = ()
    backend = job["backend"]
    worker: Any
    if backend == "fakefi":
        from tests.fakes.fakefi.autotuner import AutoTuner
        from warmplan.autotune.flashinfer import FlashInferBackend
        from warmplan.autotune.table import hybrid_buckets
        from warmplan.testing import RecordingWorker

        class FakeFiWorker(RecordingWorker):
            def dummy_run(self, shape: Any, num_tokens: int, **kw: Any) -> None:
                super().dummy_run(shape, num_tokens, **kw)
                for op in ("fake_gemm", "fake_moe"):
                    AutoTuner.get().choose_one(op, num_tokens)

        fi = FlashInferBackend(module="tests.fakes.fakefi", require_cuda=False)
        worker = FakeFiWorker(world=world, backends={"flashinfer": fi}, platform="cpu")
        backend = "flashinfer"
        passes = ((job["tokens"], hybrid_buckets(job["tokens"])),)
    else:
        worker = BuiltinWorker(
            {"device": job["device"], "num_layers": 1},
            world=world,
            compile=job["kind"] == "compile",
        )
    result: dict[str, Any] = {}
    if job["kind"] == "autotune":
        # One untimed forward at a size the step does not tune first: the process's first
        # forward (CUDA context, library handles, kernel loads, FlashInfer's JIT build)
        # is not the autotune step's cost, and cold and warm would both pay it.
        worker.dummy_run("plain", 1)
        worker.synchronize()
        per_rank = job["policy"] in ("every_rank", "together")
        name = f"tune.rank{world.rank}.json" if per_rank else "tune.json"
        step = ResolvedAutotune(
            id="autotune",
            kind="autotune",
            requested=(job["tokens"],),
            applied=(job["tokens"],),
            clamp_to="max_num_batched_tokens",
            limit=job["tokens"],
            shape="plain",
            backend=backend,
            policy=job["policy"],
            timeout_s=600,
            config_hash="bench",
            passes=passes,
            round_up=True if passes else None,
            run_after_load=job["policy"] != "together",
            cache_path=os.path.join(os.environ["WARMPLAN_CACHE_ROOT"], "autotune", backend, name),
        )
        world.barrier(timeout_s=600)
        t = time.perf_counter()
        with worker.preserve_state():
            out = run_autotune(step, worker, log=log)
        worker.synchronize()
        result = {
            "seconds": time.perf_counter() - t,
            "decision": out.decision,
            "ran_run": out.ran_run,
        }
    else:
        from warmplan.compile_cache import share_compile_caches

        def warm() -> None:
            worker.dummy_run("plain", job["tokens"])

        world.barrier(timeout_s=600)
        t0 = time.perf_counter()
        if job["share"]:
            share = share_compile_caches(world, leader_work=warm, timeout_s=600, log=log)
            result["bytes"] = share.bytes
        t1 = time.perf_counter()
        if world.rank != 0 or not job["share"]:
            warm()
        t2 = time.perf_counter()
        result.update(own_s=t2 - t1, until_warm_s=t2 - t0)
    with open(os.path.join(job["out"], f"rank{world.rank}.json"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)


# -- the launcher ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(n: int, job: dict[str, Any], env_per_rank: list[dict[str, str]]) -> list[dict[str, Any]]:
    out = tempfile.mkdtemp(prefix="wp-bench-out-")
    port = free_port()
    procs = []
    for rank in range(n):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(n),
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
        )
        env.update(env_per_rank[rank])
        cmd = [sys.executable, __file__, "--rank-job", json.dumps({**job, "out": out})]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    for rank, p in enumerate(procs):
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"rank {rank} failed ({p.returncode}):\n{err[-3000:]}")
        results.append(json.loads(Path(out, f"rank{rank}.json").read_text()))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank-job", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--compile-tokens", type=int, default=16)
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: NCCL, one GPU a rank"
    )
    ap.add_argument(
        "--backend",
        nargs="+",
        default=["builtin"],
        choices=["builtin", "triton", "flashinfer", "fakefi"],
    )
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.rank_job:
        return rank_main(json.loads(args.rank_job))

    import torch

    if args.device == "cuda" and max(args.ranks) > torch.cuda.device_count():
        ap.error(
            f"--ranks {max(args.ranks)} needs as many GPUs; this host has {torch.cuda.device_count()}"
        )
    rows: list[dict[str, Any]] = []
    for backend in args.backend:
        ranked = backend in ("flashinfer", "fakefi")
        for policy in ("leader", "every_rank", *(("together",) if ranked else ())):
            for n in args.ranks:
                root = tempfile.mkdtemp(prefix="wp-bench-cache-")
                env = [{"WARMPLAN_CACHE_ROOT": root}] * n
                for phase in ("cold", "warm"):
                    job = {
                        "kind": "autotune",
                        "policy": policy,
                        "tokens": args.tokens,
                        "backend": backend,
                        "device": args.device,
                    }
                    res = launch(n, job, env)
                    rows.append(
                        {
                            "backend": backend,
                            "policy": policy,
                            "ranks": n,
                            "cache": phase,
                            "step_s": max(r["seconds"] for r in res),
                            "decisions": sorted({r["decision"] for r in res}),
                            "forward": any(r.get("ran_run", True) for r in res),
                        }
                    )
                    print(
                        f"[autotune_ranks] {backend} {policy} {n} ranks {phase}: {rows[-1]['step_s']:.3f}s",
                        file=sys.stderr,
                        flush=True,
                    )
    compile_rows: list[dict[str, Any]] = []
    if not args.skip_compile:
        for share in (False, True):
            base = tempfile.mkdtemp(prefix="wp-bench-ind-")
            env = [
                {"TORCHINDUCTOR_CACHE_DIR": f"{base}/r{r}", "TRITON_CACHE_DIR": f"{base}/t{r}"}
                for r in range(2)
            ]
            res = launch(
                2,
                {
                    "kind": "compile",
                    "share": share,
                    "tokens": args.compile_tokens,
                    "device": args.device,
                },
                env,
            )
            compile_rows.append(
                {
                    "shared": share,
                    "follower_own_s": res[1]["own_s"],
                    "follower_until_warm_s": res[1]["until_warm_s"],
                    "bytes": res[0].get("bytes", 0),
                }
            )

    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "torch": torch.__version__,
        "card": card,
        "tokens": args.tokens,
        "device": args.device,
    }
    if args.json:
        print(json.dumps({"meta": meta, "autotune": rows, "compile_cache": compile_rows}, indent=1))
        return 0
    comm = "NCCL" if args.device == "cuda" else "gloo"
    print(
        f"# autotune step, {meta['card']}, {comm} ({meta['date']}, torch {meta['torch']}, tokens={args.tokens})"
    )
    print("| backend | policy | ranks | cache | step wall time (s) | decision | forward run |")
    print("| --- | --- | ---: | --- | ---: | --- | --- |")
    for r in rows:
        print(
            f"| {r['backend']} | {r['policy']} | {r['ranks']} | {r['cache']} | {r['step_s']:.3f} "
            f"| {'/'.join(r['decisions'])} | {'yes' if r['forward'] else 'no'} |"
        )
    if compile_rows:
        print()
        print(
            f"# follower warmup, 2 ranks, compile=True, one dummy run of {args.compile_tokens} tokens"
        )
        print(
            "| compile caches | follower's own warmup (s) | follower until warm (s) | tarball (bytes) |"
        )
        print("| --- | ---: | ---: | ---: |")
        for r in compile_rows:
            print(
                f"| {'shared from rank 0' if r['shared'] else 'not shared (cold)'} | {r['follower_own_s']:.2f} | "
                f"{r['follower_until_warm_s']:.2f} | {r['bytes']} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
