"""Start N ranks of ``rank_main.py`` as plain subprocesses with torchrun-style env.

Not torchrun itself: torchrun kills every rank as soon as one exits non-zero, and
these tests need to watch the survivors report a dead peer. Each rank's env can be
overridden (two simulated nodes = two cache roots and per-node ``LOCAL_RANK``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

RANK_MAIN = Path(__file__).with_name("rank_main.py")


@dataclass
class RankResult:
    rank: int
    returncode: int
    stderr: str
    seconds: float
    outcome: dict[str, object] | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    n: int,
    job: Mapping[str, object],
    *,
    out: Path,
    env_per_rank: Sequence[Mapping[str, str]] | None = None,
    wall_timeout_s: float = 60,
    kill_when_done: Sequence[int] = (),
) -> list[RankResult]:
    """Run ``n`` ranks to completion (or ``wall_timeout_s``); once every rank in
    ``kill_when_done`` has exited, kill the rest (a hung peer)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("outcome.rank*.json"):
        stale.unlink()
    port = free_port()
    procs = []
    start = time.monotonic()
    for rank in range(n):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(n),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(n),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            WP_JOB=json.dumps({**job, "out": str(out)}),
        )
        if env_per_rank is not None:
            env.update(env_per_rank[rank])
        procs.append(
            subprocess.Popen(
                [sys.executable, str(RANK_MAIN)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(out / f"stderr.rank{rank}", "w"),  # noqa: SIM115 - closed with the process
            )
        )
    ended: dict[int, float] = {}
    while len(ended) < n:
        now = time.monotonic()
        for rank, p in enumerate(procs):
            if rank not in ended and p.poll() is not None:
                ended[rank] = now - start
        if kill_when_done and all(r in ended for r in kill_when_done):
            for rank, p in enumerate(procs):
                if rank not in ended:
                    p.kill()
        if now - start > wall_timeout_s:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.02)
    results = []
    for rank, p in enumerate(procs):
        p.wait()
        err = (out / f"stderr.rank{rank}").read_text()
        path = out / f"outcome.rank{rank}.json"
        outcome = json.loads(path.read_text()) if path.exists() else None
        results.append(RankResult(rank, p.returncode, err, ended[rank], outcome))
    return results
