"""The executor on the recording worker: order, clamping, skips, state, report."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests._paths import PLANS
from warmplan.errors import StepError
from warmplan.executor import run_plan
from warmplan.plan import load_plan, parse_plan
from warmplan.testing import Call, FakeBackend, RecordingWorker, run_plan_text

DSV4 = load_plan(PLANS / "dsv4.yaml")
NO_FI = {"enable_flashinfer_autotune": False}


def test_dsv4_calls_in_order() -> None:
    """dsv4 on a Hopper-like worker: the three sparse-MLA shapes, then the slot-mapping fan."""
    worker = RecordingWorker(
        max_num_tokens=8192,
        max_num_batched_tokens=2048,
        flags=NO_FI,
        attention_backends=("V4_FLASHMLA_SPARSE",),
    )
    run_plan(DSV4, worker)
    mixed = {"shape": "mixed", "num_tokens": 16, "prior_context": 0, "force_attention": True}
    prefill = {
        "shape": "single_prefill",
        "num_tokens": 2048,
        "prior_context": 0,
        "force_attention": True,
    }
    second = {**prefill, "prior_context": 2048}
    assert worker.calls_named() == [
        Call("dummy_run", mixed),
        Call("dummy_run", prefill),
        Call("dummy_run", second),
        *[Call("slot_mapping", {"num_tokens": n}) for n in [*range(1, 17), 32, 64, 128, 256, 512]],
    ]


def test_clamped_duplicates_run_once() -> None:
    """With max_num_tokens 8 the slot mapping at 8 runs once, not fourteen times (and
    the built-in engine's extra sizes, all clamped to 8 too, once more)."""
    worker = RecordingWorker(max_num_tokens=8, max_num_batched_tokens=16, flags=NO_FI)
    report = run_plan(DSV4, worker)
    assert [c.args["num_tokens"] for c in worker.calls_named("slot_mapping")] == [*range(1, 9), 8]
    assert report.step("builtin-slot-mapping").applied == [8]
    step = report.step("slot-mapping")
    assert step.requested == [*range(1, 17), 32, 64, 128, 256, 512] and step.applied == list(
        range(1, 9)
    )


def test_synchronize_after_each_step() -> None:
    """The worker is synchronised once after every step that ran."""
    worker = run_plan_text(
        "version: 1\nname: t\nsteps:\n  - {id: a, kind: slot_mapping, tokens: [1, 2]}\n  - {id: b, kind: dummy_run, shape: plain, tokens: 4}\n"
    )
    assert [c.name for c in worker.calls] == [
        "slot_mapping",
        "slot_mapping",
        "synchronize",
        "dummy_run",
        "synchronize",
    ]


def test_skips_are_reported_with_reasons() -> None:
    """On a CPU the cuda-only steps are skipped with their reasons and the rest run."""
    worker = RecordingWorker(platform="cpu", max_num_batched_tokens=512)
    report = run_plan(DSV4, worker)
    skipped = {s.id: s.skipped for s in report.steps if s.skipped}
    assert skipped == {
        "slot-mapping": "gate platform: needs cuda, worker is cpu",
        "sparse-mla-decode-autotune": "gate device_capability_family: needs 120, worker has no CUDA capability (cpu)",
        "flashinfer-autotune": "gate device_capability: needs >= 9.0, worker has no CUDA capability (cpu)",
        **{
            f"builtin-{what}-keys": "the recording worker cannot compile kernels by key "
            f"(kernel {kernel!r})"
            for what, kernel in (
                ("slot", "slot_mapping"),
                ("chunk", "chunk_metadata"),
                ("forward", "forward"),
            )
        },
    }
    # The three sparse-MLA shapes; the built-in engine's compile sizes are keys now.
    assert [c.args["num_tokens"] for c in worker.calls_named("dummy_run")] == [16, 512, 512]
    # The built-in engine's bucket tuning runs (the recording worker has the backend).
    assert [c.args["num_tokens"] for c in worker.calls_named("slot_mapping")] == [
        17,
        33,
        65,
        129,
        257,
    ]


@pytest.mark.parametrize(("method", "step_id"), [("slot_mapping", "fan"), ("dummy_run", "run2")])
def test_buffers_restored_when_a_step_fails(method: str, step_id: str) -> None:
    """A failing step leaves every runner buffer as it found it, and the error names the step."""
    worker = RecordingWorker(fail_on={method: 2})
    worker.buffers = {
        "positions": list(range(16, 32)),
        "query_start_loc": [3, 9],
        "slot_mapping": [7] * 16,
    }
    before = copy.deepcopy(worker.buffers)
    plan = parse_plan(
        "version: 1\nname: t\nsteps:\n  - {id: fan, kind: slot_mapping, tokens: [1, 2, 3]}\n"
        "  - {id: run, kind: dummy_run, shape: mixed, tokens: 16}\n  - {id: run2, kind: dummy_run, shape: plain, tokens: 32}\n"
    )
    with pytest.raises(StepError) as info:
        run_plan(plan, worker)
    assert (
        str(info.value) == f"step {step_id!r}: InjectedFailure: injected failure in {method} call 2"
    )
    assert worker.buffers == before
    partial = info.value.report  # type: ignore[attr-defined]
    assert partial.failed == str(info.value)
    assert partial.steps[-1].id == step_id and partial.steps[-1].error


def test_buffers_restored_after_success() -> None:
    """Steps that ran leave the buffers as they were before the plan."""
    worker = RecordingWorker(flags=NO_FI)
    before = copy.deepcopy(worker.buffers)
    run_plan(DSV4, worker)
    assert worker.buffers == before


def test_report_fields(tmp_path: Path) -> None:
    """The report carries plan, worker, per-step fields and totals (docs/report.md)."""
    worker = RecordingWorker(max_num_tokens=8, flags=NO_FI)
    report = run_plan(DSV4, worker)
    out = tmp_path / "r.json"
    report.write(out)
    data = json.loads(out.read_text())
    assert set(data) == {"report_version", "plan", "worker", "steps", "totals", "failed"}
    assert data["plan"] == {"name": "dsv4", "path": str(PLANS / "dsv4.yaml"), "sha256": DSV4.sha256}
    assert {"engine", "device", "versions", "rank", "local_rank", "world_size"} <= set(
        data["worker"]
    )
    assert data["worker"]["world_size"] == 1 and data["worker"]["rank"] == 0
    first = next(s for s in data["steps"] if s["id"] == "slot-mapping")
    assert {
        "id",
        "kind",
        "requested",
        "applied",
        "skipped",
        "duration_s",
        "compiles",
        "autotune",
    } <= set(first)
    assert first["applied"] == list(range(1, 9))
    assert set(data["totals"]) >= {"duration_s", "compiles"}
    assert data["failed"] is None
    assert not list(tmp_path.glob(".*tmp"))


def _sm120(tmp_path: Path, **kw: object) -> tuple[RecordingWorker, dict[str, object]]:
    backends = {name: FakeBackend(name=name) for name in ("flashinfer_dsv4_decode", "flashinfer")}
    worker = RecordingWorker(
        max_num_tokens=8,
        max_num_batched_tokens=2048,
        device_capability=(12, 0),
        attention_backends=("V4_FLASHMLA_SPARSE",),
        flags={"enable_flashinfer_autotune": True},
        backends=backends,
        **kw,  # type: ignore[arg-type]
    )
    return worker, backends  # type: ignore[return-value]


def test_autotune_covers_the_step_it_replaces(tmp_path: Path) -> None:
    """On SM120 the decode autotune runs the mixed shape under tuning, and the mixed step is skipped as covered."""
    worker, backends = _sm120(tmp_path)
    report = run_plan(DSV4, worker, cache_root=str(tmp_path))
    mixed = {"shape": "mixed", "num_tokens": 16, "prior_context": 0, "force_attention": True}
    runs = [c.args for c in worker.calls_named("dummy_run")]
    assert runs.count(mixed) == 1 and runs[0] == mixed
    assert (
        report.step("sparse-mla-mixed").skipped
        == "covered by sparse-mla-decode-autotune, which ran this shape"
    )
    tune = report.step("sparse-mla-decode-autotune").autotune
    assert tune is not None and tune["decision"] == "tune" and tune["fingerprint"]
    assert backends["flashinfer_dsv4_decode"].tuned_count == 1  # type: ignore[attr-defined]
    again = run_plan(DSV4, _sm120(tmp_path)[0], cache_root=str(tmp_path))
    loaded = again.step("sparse-mla-decode-autotune").autotune
    assert (
        loaded is not None
        and loaded["decision"] == "load"
        and loaded["fingerprint"] == tune["fingerprint"]
    )


def test_autotune_step_failure_restores_buffers(tmp_path: Path) -> None:
    """A failure inside an autotune step's run leaves the buffers as they were and names the step."""
    worker, _ = _sm120(tmp_path, fail_on={"dummy_run": 1})
    before = copy.deepcopy(worker.buffers)
    with pytest.raises(StepError) as info:
        run_plan(DSV4, worker, cache_root=str(tmp_path))
    assert (
        str(info.value)
        == "rank 0, step 'sparse-mla-decode-autotune': tuning raised InjectedFailure: injected failure in dummy_run call 1"
    )
    assert worker.buffers == before
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_load_only_plan_without_on_missing_skips(tmp_path: Path) -> None:
    """A load_only step with no cache and no on_missing skips with a reason (it never tunes)."""
    text = (
        "version: 1\nname: t\nsteps:\n"
        "  - {id: t, kind: autotune, backend: builtin, run: {shape: plain, tokens: 8}, cache: {policy: load_only}}\n"
    )
    worker = RecordingWorker(backends={"builtin": FakeBackend(name="builtin")})
    report = run_plan(parse_plan(text), worker, cache_root=str(tmp_path))
    tune = report.step("t").autotune
    assert tune is not None and tune["decision"] == "skip" and tune["policy"] == "load_only"
    assert worker.calls_named("dummy_run") == []


def test_own_monitor_is_uninstalled_on_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C inside a step leaves no monitor hooks installed behind it."""
    from warmplan import executor
    from warmplan.monitor import NoMonitor

    class Spy(NoMonitor):
        uninstalled = 0

        def uninstall(self) -> None:
            self.uninstalled += 1

    class Interrupted(RecordingWorker):
        def slot_mapping(self, num_tokens: int) -> None:
            raise KeyboardInterrupt

    spy = Spy()
    monkeypatch.setattr(executor, "_make_monitor", lambda: spy)
    with pytest.raises(KeyboardInterrupt):
        run_plan(DSV4, Interrupted(max_num_tokens=8))
    assert spy.uninstalled == 1
