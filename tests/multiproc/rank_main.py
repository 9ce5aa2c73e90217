"""One rank of a multi-process autotune / compile-cache test (run as a script).

Reads its job from ``WP_JOB`` (JSON), joins the world from the launcher's env, runs
the job through ``run_autotune`` (or ``share_compile_caches``) and writes the outcome
to ``<out>/outcome.rank<R>.json``. A ``StepError`` prints its message on stderr and
exits with its exit code (2).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from warmplan.autotune import default_on_missing  # noqa: E402
from warmplan.errors import StepError  # noqa: E402
from warmplan.fsutil import default_cache_root  # noqa: E402
from warmplan.log import get_logger  # noqa: E402
from warmplan.steps.autotune import ResolvedAutotune, run_autotune  # noqa: E402
from warmplan.testing import FakeBackend, RecordingWorker  # noqa: E402
from warmplan.world import WorldTimeout, current_world  # noqa: E402


class EnvFakeBackend(FakeBackend):
    """A ``FakeBackend`` a test drives through the environment of each rank.

    Each entry into ``tuning()`` appends a line to ``<record_dir>/tuned.rank<R>`` and
    each ``load`` to ``loaded.rank<R>``, so the test can count exactly who tuned.
    ``WARMPLAN_FAKE_RECORD_DIR``, ``WARMPLAN_FAKE_VERSION``, ``WARMPLAN_FAKE_UNAVAILABLE``,
    ``WARMPLAN_FAKE_TUNE_SECONDS`` (tuning takes this long) and
    ``WARMPLAN_FAKE_DIE_IN_TUNING=1`` (the process exits abruptly inside ``tuning()``:
    a leader killed mid-tune).
    """

    def __init__(self, *, rank: int, env: Mapping[str, str]) -> None:
        super().__init__(
            version=env.get("WARMPLAN_FAKE_VERSION", "1"),
            rank=rank,
            unavailable=env.get("WARMPLAN_FAKE_UNAVAILABLE") or None,
        )
        self.record_dir = env.get("WARMPLAN_FAKE_RECORD_DIR") or None
        self.die_in_tuning = env.get("WARMPLAN_FAKE_DIE_IN_TUNING") == "1"
        self.tune_seconds = float(env.get("WARMPLAN_FAKE_TUNE_SECONDS", "0"))

    def _record(self, what: str, line: str) -> None:
        if self.record_dir is None:
            return
        os.makedirs(self.record_dir, exist_ok=True)
        with open(os.path.join(self.record_dir, f"{what}.rank{self.rank}"), "a") as f:
            f.write(line + "\n")

    @contextlib.contextmanager
    def tuning(self) -> Iterator[None]:
        self._record("tuned", f"pid={os.getpid()}")
        if self.die_in_tuning:
            os._exit(17)
        with super().tuning():
            yield
            if self.tune_seconds:
                time.sleep(self.tune_seconds)

    def load(self, payload: bytes) -> None:
        super().load(payload)
        self._record("loaded", json.dumps(self.loaded, sort_keys=True))


def cache_path(job: dict[str, object], rank: int) -> str:
    name = f"tune.rank{rank}.json" if job.get("per_rank") else "tune.json"
    return os.path.join(default_cache_root(), "autotune", str(job.get("backend", "fake")), name)


class FakeFiWorker(RecordingWorker):
    """A worker whose dummy run calls two FlashInfer-shaped tuned ops (the fake
    ``tests.fakes.fakefi`` tuner) at its token count, as a model's forward would."""

    def dummy_run(self, shape: Any, num_tokens: int, **kw: Any) -> None:
        from tests.fakes.fakefi.autotuner import AutoTuner

        super().dummy_run(shape, num_tokens, **kw)
        tuner = AutoTuner.get()
        for op in ("fake_gemm", "fake_moe"):
            tuner.choose_one(op, num_tokens)


def fakefi_facts() -> dict[str, object]:
    from tests.fakes.fakefi.autotuner import AutoTuner

    tuner = AutoTuner.get()
    return {
        "chosen": tuner.chosen,
        "tactics": {k: v[1] for k, v in sorted(tuner.profiling_cache.items())},
        "loaded": sorted(tuner._file_configs),
        "reduces": tuner.reduces,
    }


def make_worker(job: dict[str, object], world: object) -> object:
    if job.get("backend") == "flashinfer":
        from warmplan.autotune.flashinfer import FlashInferBackend

        fi = FlashInferBackend(module="tests.fakes.fakefi", require_cuda=False)
        return FakeFiWorker(world=world, backends={"flashinfer": fi}, platform="cpu")  # type: ignore[arg-type,dict-item]
    if job.get("backend") == "builtin":
        from warmplan.workers.builtin.worker import BuiltinWorker

        return BuiltinWorker(
            {"device": "cpu", "num_layers": 1}, world=world, compile=bool(job.get("compile", False))
        )  # type: ignore[arg-type]
    backend = EnvFakeBackend(rank=world.rank, env=os.environ)  # type: ignore[attr-defined]
    return RecordingWorker(world=world, backends={"fake": backend}, platform="cpu")  # type: ignore[arg-type]


def world_job(world: Any) -> dict[str, object]:
    """The collectives themselves; then rank 1 hangs and rank 0's barrier must name it."""
    r = world.rank
    big = bytes(range(256)) * 40_000
    got = {
        "none": world.broadcast_bytes(None, timeout_s=10) is None,
        "empty": world.broadcast_bytes(b"" if r == 1 else None, src=1, timeout_s=10) == b"",
        "big_ok": world.broadcast_bytes(big if r == 0 else None, timeout_s=10) == big,
        "gather": world.all_gather_str("é" * (r + 1), timeout_s=10),
    }
    if r == 1:
        time.sleep(60)
    try:
        world.barrier(timeout_s=2)
    except WorldTimeout as exc:
        got["timeout"] = str(exc)
    return got


def main() -> int:
    job = json.loads(os.environ["WP_JOB"])
    out = job["out"]
    timeout_s = float(job.get("timeout_s", 20))
    world = current_world(timeout_s=timeout_s)
    rank = world.rank
    worker = make_worker(job, world)
    log = get_logger("rank")
    start = time.monotonic()
    result: dict[str, object]
    try:
        if job.get("kind") == "world":
            result = world_job(world)
        elif job.get("kind") == "compile_cache":
            from warmplan.compile_cache import share_compile_caches

            def leader_work() -> None:
                if job.get("leader_fails"):
                    raise StepError("slot-mapping", "injected failure", rank=0)
                root = os.environ["TORCHINDUCTOR_CACHE_DIR"]
                os.makedirs(os.path.join(root, "fxgraph", "ab"), exist_ok=True)
                with open(os.path.join(root, "fxgraph", "ab", "graph.bin"), "wb") as f:
                    f.write(b"compiled" * 1000)

            o = share_compile_caches(world, leader_work=leader_work, timeout_s=timeout_s, log=log)
            result = {"role": o.role, "bytes": o.bytes}
        else:
            backend = str(job.get("backend", "fake"))
            policy = str(job.get("policy", "leader"))
            step = ResolvedAutotune(
                id="autotune-step",
                kind="autotune",
                requested=(64,),
                applied=(int(job.get("tokens", 64)),),
                clamp_to="max_num_batched_tokens",
                limit=512,
                shape="plain",
                backend=backend,
                policy=job.get("policy", "leader"),  # type: ignore[arg-type]
                on_missing=job.get("on_missing") or default_on_missing(job.get("policy", "leader")),  # type: ignore[arg-type]
                timeout_s=timeout_s,
                cache_path=cache_path(job, rank),
                config_hash="cfg1",
                run_after_load=bool(job.get("run_after_load", policy != "together")),
            )
            with worker.preserve_state():  # type: ignore[attr-defined]
                o2 = run_autotune(step, worker, log=log)  # type: ignore[arg-type]
            result = {
                "decision": o2.decision,
                "ran_run": o2.ran_run,
                "cache_path": o2.cache_path,
                "fingerprint": o2.fingerprint,
                "reason": o2.reason,
                "runs": len(getattr(worker, "calls_named", lambda *a: [])("dummy_run")),
            }
            if backend == "flashinfer":
                result.update(fakefi_facts(), ignored=o2.ignored, run_skipped=o2.run_skipped)
    except StepError as exc:
        print(f"ELAPSED {time.monotonic() - start:.3f}", file=sys.stderr)
        print(f"ERROR {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    result["seconds"] = time.monotonic() - start
    with open(os.path.join(out, f"outcome.rank{rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    # Skip interpreter teardown: a peer's failure must not hang us in gloo's destructors.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
