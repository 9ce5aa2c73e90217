"""Policy together, every_rank's mixed hit/miss, FlashInfer's knobs and tables, with
ranks as threads and a per-rank FlashInfer-shaped fake backend."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.test_autotune_policy import LOG, make_step, run_ranks, runs, worker_for
from warmplan.autotune.cache import encode_cache
from warmplan.autotune.table import bucket_of, foreign_fields, hybrid_buckets, parse_table
from warmplan.errors import PlanError, StepError
from warmplan.plan import parse_plan
from warmplan.resolve import resolve
from warmplan.steps.autotune import AutotuneOutcome, ResolvedAutotune, run_autotune
from warmplan.steps.base import CacheContext
from warmplan.testing import FakeBackend
from warmplan.workers.base import Facts, Limits
from warmplan.world import LocalWorld

DATA = Path(__file__).parent / "data"
STACK = {"flashinfer_version": "0.7.2", "cuda_version": "13.0", "gpu": "NVIDIA H200"}


class RankedFake(FakeBackend):
    """A FakeBackend shaped like FlashInfer: its payload is a FlashInfer table, it
    can clear, and records the knobs tuning got."""

    tunes_together = True

    def __init__(self, *, stack: Mapping[str, str] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.stack = dict(stack or STACK)
        self.cleared = 0
        self.scopes: list[tuple[tuple[int, ...] | None, bool | None]] = []
        self.skip_ops: tuple[str, ...] = ()
        self.fail_load = False

    def running_metadata(self) -> Mapping[str, str] | None:
        return self.stack

    def clear(self) -> None:
        self.cleared += 1
        self.loaded = None

    def tune_process_group(self, world: Any) -> Any:
        return None

    @contextlib.contextmanager
    def tuning_together(self, *, group: Any, skip_ops: tuple[str, ...]) -> Iterator[None]:
        self.skip_ops = skip_ops
        with self.tuning():
            yield

    def pass_scope(
        self, *, buckets: tuple[int, ...] | None, round_up: bool | None
    ) -> contextlib.AbstractContextManager[None]:
        self.scopes.append((buckets, round_up))
        return contextlib.nullcontext()

    def export(self) -> bytes:
        if not self.tuned_count:
            return b""
        doc: dict[str, Any] = {"_metadata": self.stack}
        for m in (1, 2, 4, 512):
            doc[str(("bf16_gemm", "Runner", ((m, 64), (64, 64))))] = ["Runner", 3]
        return json.dumps(doc).encode()

    def load(self, payload: bytes) -> None:
        if self.fail_load:
            from warmplan.workers.base import AutotuneLoadError

            raise AutotuneLoadError("injected")
        self.loaded = json.loads(payload)


def tstep(tmp_path: Path, r: int, **kw: Any) -> Any:
    kw.setdefault("policy", "together")
    kw.setdefault("run_after_load", False)
    return make_step(tmp_path / f"c.rank{r}.json", backend="fake", **kw)


def outs(results: list[Any]) -> list[AutotuneOutcome]:
    for r in results:
        assert isinstance(r, AutotuneOutcome), r
    return list(results)


def test_together_cold_tunes_every_rank_then_warm_loads_without_a_forward(
    tmp_path: Path,
) -> None:
    """Cold: every rank tunes (clearing first) and writes its own file. Warm: every
    rank loads and none runs the tuning forward; the outcome says so and what the
    table covers."""
    results, backends, workers = run_ranks(
        2, lambda r: tstep(tmp_path, r), backend_for=lambda r: RankedFake(rank=r)
    )
    cold = outs(results)
    assert [o.decision for o in cold] == ["tune", "tune"]
    assert [b.tuned_count for b in backends if b] == [1, 1]
    assert [runs(w) for w in workers] == [1, 1]
    assert all((tmp_path / f"c.rank{r}.json").exists() for r in range(2))
    assert cold[0].table is not None and cold[0].table.coverage == {"bf16_gemm": [1, 2, 4, 512]}

    results, backends, workers = run_ranks(
        2, lambda r: tstep(tmp_path, r), backend_for=lambda r: RankedFake(rank=r)
    )
    warm = outs(results)
    assert [(o.decision, o.ran_run) for o in warm] == [("load", False)] * 2
    assert [runs(w) for w in workers] == [0, 0]
    assert [b.tuned_count for b in backends if b] == [0, 0]
    assert all(b is not None and b.loaded for b in backends)
    assert warm[0].run_skipped == (
        "every rank loaded its results; the tuning forward (plain x 512) was not run "
        "(run_after_load: false)"
    )


def test_together_run_after_load_runs_the_forward(tmp_path: Path) -> None:
    """run_after_load: true runs the forward (plainly) after a unanimous load."""
    run_ranks(2, lambda r: tstep(tmp_path, r), backend_for=lambda r: RankedFake(rank=r))
    results, backends, workers = run_ranks(
        2,
        lambda r: tstep(tmp_path, r, run_after_load=True),
        backend_for=lambda r: RankedFake(rank=r),
    )
    assert [(o.decision, o.ran_run) for o in outs(results)] == [("load", True)] * 2
    assert [runs(w) for w in workers] == [1, 1]
    assert [b.tuned_count for b in backends if b] == [0, 0]


def test_together_partial_hit_makes_every_rank_tune(tmp_path: Path) -> None:
    """One rank of three lacks its file: nobody loads, every rank clears and tunes,
    and the reason names the rank."""
    run_ranks(3, lambda r: tstep(tmp_path, r), backend_for=lambda r: RankedFake(rank=r))
    (tmp_path / "c.rank2.json").unlink()
    results, backends, _ = run_ranks(
        3, lambda r: tstep(tmp_path, r), backend_for=lambda r: RankedFake(rank=r)
    )
    got = outs(results)
    assert [o.decision for o in got] == ["tune"] * 3
    assert [b.tuned_count for b in backends if b] == [1, 1, 1]
    assert [b.cleared for b in backends if isinstance(b, RankedFake)] == [1, 1, 1]
    assert got[0].reason == f"rank 2: no cache file at {tmp_path / 'c.rank2.json'}"


def test_together_files_that_differ_make_every_rank_tune(tmp_path: Path) -> None:
    """Every rank has a file but one holds another entry count: every rank tunes."""
    run_ranks(2, lambda r: tstep(tmp_path, r), backend_for=lambda r: RankedFake(rank=r))
    f = tmp_path / "c.rank1.json"
    doc = json.loads(f.read_text())
    from base64 import b64decode

    table = json.loads(b64decode(doc["payload_b64"]))
    table["('extra_op', 'R', ((8, 8),))"] = ["R", 0]
    f.write_bytes(encode_cache(doc["metadata"], json.dumps(table).encode()))
    results, _, _ = run_ranks(
        2, lambda r: tstep(tmp_path, r), backend_for=lambda r: RankedFake(rank=r)
    )
    got = outs(results)
    assert [o.decision for o in got] == ["tune", "tune"]
    assert got[0].reason is not None and got[0].reason.startswith("the ranks' files differ: ")


def test_together_a_failed_load_makes_every_rank_clear_and_tune(tmp_path: Path) -> None:
    """Every file matches but rank 1's backend refuses its table: rank 0, which had
    loaded, clears it, and both tune."""
    run_ranks(2, lambda r: tstep(tmp_path, r), backend_for=lambda r: RankedFake(rank=r))

    def backend(r: int) -> RankedFake:
        b = RankedFake(rank=r)
        b.fail_load = r == 1
        return b

    results, backends, _ = run_ranks(2, lambda r: tstep(tmp_path, r), backend_for=backend)
    got = outs(results)
    assert [o.decision for o in got] == ["tune", "tune"]
    assert [b.cleared for b in backends if isinstance(b, RankedFake)] == [1, 1]
    assert got[0].reason is not None and "loading failed on rank 1" in got[0].reason


def test_together_foreign_table_is_ignored_naming_the_field(tmp_path: Path) -> None:
    """A table tuned under another CUDA is not loaded: the outcome and the log say
    which field differs, and the rank tunes."""
    run_autotune(tstep(tmp_path, 0), worker_for(LocalWorld(), RankedFake()), log=LOG)
    other = RankedFake(stack={**STACK, "cuda_version": "13.1"})
    with capture_logs() as logs:
        out = run_autotune(tstep(tmp_path, 0), worker_for(LocalWorld(), other), log=LOG)
    want = "ignored: cuda_version differs: file has '13.0', running '13.1'"
    assert (out.decision, out.ignored) == ("tune", want)
    assert any(e.get("ignored") == want for e in logs if e["event"] == "autotune.cache_unusable")


def test_leader_also_ignores_a_foreign_table(tmp_path: Path) -> None:
    """Under leader, rank 0's foreign file is retuned, not loaded and refused."""
    path = tmp_path / "c.json"
    run_autotune(make_step(path), worker_for(LocalWorld(), RankedFake()), log=LOG)
    other = RankedFake(stack={**STACK, "gpu": "NVIDIA B200"})
    out = run_autotune(make_step(path), worker_for(LocalWorld(), other), log=LOG)
    assert out.decision == "tune"
    assert out.ignored == "ignored: gpu differs: file has 'NVIDIA H200', running 'NVIDIA B200'"


def test_together_needs_a_ranked_backend(tmp_path: Path) -> None:
    """A backend that cannot tune together fails the step, saying to use leader."""
    with pytest.raises(StepError, match="policy together needs a backend"):
        run_autotune(tstep(tmp_path, 0), worker_for(LocalWorld(), FakeBackend()), log=LOG)


def test_every_rank_mixed_hit_and_miss_makes_every_rank_tune(tmp_path: Path) -> None:
    """every_rank: rank 0 has its file, rank 1 not; both tune (a rank that loads while
    another tunes would run a different forward)."""

    def step(r: int) -> Any:
        return make_step(tmp_path / f"c.rank{r}.json", policy="every_rank")

    run_ranks(2, step)
    (tmp_path / "c.rank1.json").unlink()
    results, backends, workers = run_ranks(2, step)
    got = outs(results)
    assert [o.decision for o in got] == ["tune", "tune"]
    assert [b.tuned_count for b in backends if b] == [1, 1]
    assert [runs(w) for w in workers] == [1, 1]
    assert got[0].reason is not None and got[0].reason.startswith("every rank tunes: rank 1: ")


def test_knobs_reach_the_backend(tmp_path: Path) -> None:
    """Each pass tunes under its buckets and round_up; skip_ops reach tuning."""
    backend = RankedFake()
    step = tstep(
        tmp_path,
        0,
        applied=(512, 64),
        passes=((512, hybrid_buckets(512)), (64, hybrid_buckets(64))),
        round_up=True,
        skip_ops=("fp4_gemm",),
    )
    run_autotune(step, worker_for(LocalWorld(), backend), log=LOG)
    assert backend.scopes == [(hybrid_buckets(512), True), (hybrid_buckets(64), True)]
    assert backend.skip_ops == ("fp4_gemm",)


def test_randomize_inputs_needs_a_worker_that_takes_it(tmp_path: Path) -> None:
    """randomize_inputs on a worker whose dummy_run lacks it fails before any run."""
    worker = worker_for(LocalWorld(), RankedFake())
    with pytest.raises(StepError, match="takes no randomize_inputs"):
        run_autotune(tstep(tmp_path, 0, randomize_inputs=True), worker, log=LOG)
    assert runs(worker) == 0


# --------------------------------------------------------------------------- plans

PLAN = """\
version: 1
name: t
steps:
  - id: fi
    kind: autotune
    backend: {backend}
    run: {{shape: plain, tokens: max_num_batched_tokens}}
{extra}"""


def plan_error(backend: str, extra: str) -> str:
    with pytest.raises(PlanError) as info:
        parse_plan(PLAN.format(backend=backend, extra=extra), file="p.yaml")
    return str(info.value)


def test_plan_together_needs_flashinfer() -> None:
    """policy together on the builtin backend: named at file:line, with the fix."""
    msg = plan_error("builtin", "    cache: {policy: together}\n")
    assert msg == (
        "p.yaml:8:21: steps[0].cache.policy: policy together needs a backend whose ranks "
        "tune together (flashinfer); backend 'builtin' cannot: use leader"
    )


def test_plan_vllm_identity_takes_no_path() -> None:
    """identity vllm names vLLM's own files: a path beside it is an error."""
    msg = plan_error(
        "flashinfer", '    cache: {identity: vllm, path: "{cache_root}/x/{rank}.json"}\n'
    )
    assert "identity vllm names vLLM's own files: expected no cache.path beside it" in msg


def test_plan_tuning_knobs_are_flashinfers() -> None:
    """tuning: on a backend other than flashinfer is an error naming the field."""
    msg = plan_error("triton", "    tuning: {round_up: true}\n")
    assert "tuning knobs are FlashInfer's: expected backend flashinfer, found 'triton'" in msg


def test_plan_resolves_hybrid_passes_with_draft_tokens(tmp_path: Path) -> None:
    """Hybrid buckets per pass reach the drafter's M; extra_tokens add a pass; the
    per-rank default path; together skips the forward after a load by default."""
    plan = parse_plan(
        PLAN.format(
            backend="flashinfer",
            extra=(
                "    cache: {policy: together}\n"
                "    tuning: {buckets: hybrid, draft_tokens: 600, round_up: true,"
                " extra_tokens: [256], skip_ops: [fp4_gemm]}\n"
            ),
        ),
        file="p.yaml",
    )
    limits = Limits(max_num_tokens=1024, max_num_batched_tokens=512, max_num_seqs=64)
    facts = Facts(platform="cuda", device_capability=(9, 0))
    cache = CacheContext(cache_root=str(tmp_path), arch="sm90", rank=3, world_size=4)
    (step,) = resolve(plan, limits, facts, cache).steps
    assert isinstance(step, ResolvedAutotune)
    assert step.applied == (512, 256)
    assert step.passes == ((512, hybrid_buckets(600)), (256, hybrid_buckets(600)))
    assert (step.round_up, step.skip_ops, step.run_after_load) == (True, ("fp4_gemm",), False)
    assert step.cache_path.endswith("/rank3.json")


def test_plan_vllm_identity_renders_vllms_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """identity vllm resolves to vLLM 0.34's per-rank file under its root."""
    monkeypatch.setenv("VLLM_FLASHINFER_AUTOTUNE_CACHE_DIR", str(tmp_path / "vllm-fi"))
    plan = parse_plan(
        PLAN.format(backend="flashinfer", extra="    cache: {identity: vllm, policy: together}\n")
    )
    limits = Limits(max_num_tokens=64, max_num_batched_tokens=64, max_num_seqs=8)
    cache = CacheContext(cache_root=str(tmp_path), arch="sm90", rank=1, world_size=2)
    (step,) = resolve(plan, limits, Facts(platform="cuda", device_capability=(9, 0)), cache).steps
    assert isinstance(step, ResolvedAutotune)
    assert step.cache_path == str(
        tmp_path / "vllm-fi" / str(step.config_hash) / "autotune_configs_dp0_rank1.json"
    )


# --------------------------------------------------------------------------- tables


def test_parse_a_real_flashinfer_table() -> None:
    """The table FlashInfer 0.7.2.post1 wrote on an H200 (bf16_gemm, hybrid buckets to
    256): 9 entries (``_generation`` is bookkeeping), covering 1..256."""
    table = parse_table((DATA / "flashinfer-0.7.2.post1-h200-bf16_gemm.json").read_bytes())
    assert table.entries == 9
    assert table.coverage == {"bf16_gemm": [1, 2, 4, 8, 16, 32, 64, 128, 256]}
    assert table.metadata is not None and table.metadata["gpu"] == "NVIDIA H200"
    assert len(table.metadata) == 7


def test_foreign_fields_follow_flashinfers_rule() -> None:
    """Every running field must match or be '*' in the file; no metadata, no check."""
    running = {"cuda_version": "13.0", "gpu": "NVIDIA H200"}
    assert foreign_fields({"cuda_version": "*", "gpu": "NVIDIA H200"}, running) == []
    assert foreign_fields(None, running) == []
    assert foreign_fields({"cuda_version": "13.0"}, running) == [
        "gpu differs: file has absent, running 'NVIDIA H200'"
    ]


def test_hybrid_buckets_and_rounding() -> None:
    """FlashInfer's hybrid buckets; floor and round-up serving, clamped."""
    assert hybrid_buckets(8192) == (
        1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048,
        2560, 3072, 3584, 4096, 8192,
    )  # fmt: skip
    assert hybrid_buckets(300)[-2:] == (256, 300)
    assert hybrid_buckets(10000)[-2:] == (8192, 10000)
    b = hybrid_buckets(512)
    assert (bucket_of(300, b, round_up=False), bucket_of(300, b, round_up=True)) == (256, 512)
    assert bucket_of(9000, b, round_up=True) == 512


def test_flashinfer_defaults_to_together_others_to_leader(tmp_path: Path) -> None:
    """No policy named: FlashInfer tunes together (a per-rank file, no forward after
    a load), the other backends keep leader."""
    limits = Limits(max_num_tokens=64, max_num_batched_tokens=64, max_num_seqs=8)
    cache = CacheContext(cache_root=str(tmp_path), arch="sm90", rank=1, world_size=2)
    facts = Facts(platform="cuda", device_capability=(9, 0))
    got = {}
    for backend in ("flashinfer", "triton"):
        (step,) = resolve(
            parse_plan(PLAN.format(backend=backend, extra="")), limits, facts, cache
        ).steps
        assert isinstance(step, ResolvedAutotune)
        got[backend] = (step.policy, step.run_after_load, step.cache_path.endswith("/rank1.json"))
    assert got == {"flashinfer": ("together", False, True), "triton": ("leader", True, False)}


def test_report_says_what_was_ignored_loaded_and_skipped(tmp_path: Path) -> None:
    """Through the executor: the report's autotune entry carries why a file was
    ignored, the table's entries and coverage, and the skipped forward of a load."""
    from warmplan.executor import run_plan
    from warmplan.testing import RecordingWorker

    plan = parse_plan(PLAN.format(backend="flashinfer", extra=""))

    def report(stack: Mapping[str, str]) -> dict[str, Any]:
        backend = RankedFake(name="flashinfer", stack=stack)
        worker = RecordingWorker(backends={"flashinfer": backend})
        entry = run_plan(plan, worker, cache_root=str(tmp_path)).to_dict()["steps"][0]
        return dict(entry["autotune"])

    cold = report(STACK)
    assert (cold["decision"], cold["ignored"], cold["entries"]) == ("tune", None, 4)
    assert cold["coverage"] == {"bf16_gemm": [1, 2, 4, 512]}
    warm = report(STACK)
    assert (warm["decision"], warm["ran_run"]) == ("load", False)
    assert warm["run_skipped"].endswith("was not run (run_after_load: false)")
    foreign = report({**STACK, "flashinfer_version": "0.7.3"})
    assert foreign["decision"] == "tune"
    assert foreign["ignored"] == (
        "ignored: flashinfer_version differs: file has '0.7.2', running '0.7.3'"
    )


def test_together_on_missing_skip_skips_every_rank_and_keeps_nothing(tmp_path: Path) -> None:
    """on_missing: skip and one rank's file missing: every rank skips, none tunes,
    and the rank that had a table does not keep it loaded."""
    run_ranks(2, lambda r: tstep(tmp_path, r), backend_for=lambda r: RankedFake(rank=r))
    (tmp_path / "c.rank1.json").unlink()
    results, backends, workers = run_ranks(
        2,
        lambda r: tstep(tmp_path, r, on_missing="skip"),
        backend_for=lambda r: RankedFake(rank=r),
    )
    got = outs(results)
    assert [(o.decision, o.ran_run) for o in got] == [("skip", False)] * 2
    assert [b.tuned_count for b in backends if b] == [0, 0]
    assert all(b is not None and b.loaded is None for b in backends)
    assert [runs(w) for w in workers] == [0, 0]
