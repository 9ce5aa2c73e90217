"""Reliability at the command line: bad options, bad launcher variables, bad output
paths and a step failure whose report cannot be written each end in one clear
message and the documented exit code, never a traceback; each message pinned whole."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._paths import PLANS, ROOT
from warmplan.cli import main
from warmplan.errors import UserError
from warmplan.report import Report

SMOKE = str(PLANS / "builtin-smoke.yaml")
DENSE = str(PLANS / "dense-llm.yaml")


@pytest.mark.parametrize(
    ("argv", "last_line"),
    [
        (["run", SMOKE, "--frobnicate"], "warmplan: error: unrecognized arguments: --frobnicate"),
        (
            ["plan", DENSE, "--max-num-tokens", "-5", "--max-num-batched-tokens", "8"],
            "warmplan plan: error: argument --max-num-tokens: expected an integer >= 0, found -5",
        ),
        (
            ["plan", DENSE, "--max-num-batched-tokens", "8"],
            "warmplan plan: error: the following arguments are required: --max-num-tokens",
        ),
        (
            ["run", SMOKE, "--device", "tpu"],
            "warmplan run: error: argument --device: invalid choice: 'tpu' (choose from 'auto', 'cpu', 'cuda')",
        ),
    ],
)
def test_bad_options_exit_1_not_2(
    argv: list[str], last_line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad options (probe D3) exit 1, a user error; 2 is kept for a failed step."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == last_line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--world-size", "0"], "warmplan: error: --world-size: expected an integer >= 1, found 0"),
        (
            ["--rank", "5", "--world-size", "2"],
            "warmplan: error: --rank: expected a rank below --world-size (2), found 5",
        ),
    ],
)
def test_impossible_worlds_are_refused(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan --world-size 0` and `--rank 5 --world-size 2` (probe M9) exit 1."""
    argv = ["plan", DENSE, "--max-num-tokens", "8", "--max-num-batched-tokens", "8", *extra]
    assert main(argv) == 1
    assert capsys.readouterr().err == message + "\n"


def test_schema_write_to_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`schema --write DIR` (probe M10) is a one-line error, not IsADirectoryError."""
    assert main(["schema", "--write", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"warmplan: error: --write {tmp_path}: cannot write the schema: is a directory\n"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE must be a non-negative integer: 'abc'"),
        ({"WORLD_SIZE": "2", "RANK": "abc"}, "RANK must be a non-negative integer: 'abc'"),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "abc"},
            "LOCAL_RANK must be a non-negative integer: 'abc'",
        ),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK must be < WORLD_SIZE (2): 2"),
        (
            {"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "99999"},
            "MASTER_PORT must be from 1 to 65535: 99999",
        ),
    ],
)
def test_bad_launcher_variables_are_named(
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bad launcher variables (probe D13) name the variable, exit 1, and do not blame the plan."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["run", SMOKE, "--device", "cpu"]) == 1
    assert capsys.readouterr().err == f"warmplan: error: {message}\n"


def test_issue_16_kv_pool_fails_in_under_a_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """dense-llm at 2048 tokens (issue 16) fails before the engine is built, naming
    the step and "num_blocks", instead of after a minute of tuning and compiling."""
    mc = tmp_path / "mc.yaml"
    mc.write_text("max_num_tokens: 2048\nmax_num_batched_tokens: 2048\n")
    started = time.perf_counter()
    code = main(
        ["run", DENSE, "--device", "cpu", "--model-config", str(mc), "--cache-root", str(tmp_path)]
    )
    assert time.perf_counter() - started < 1.0
    assert code == 1
    assert capsys.readouterr().err == (
        f"warmplan: error: {DENSE}: builtin: step 'second-chunk' (single_prefill of 2048 tokens after "
        "2048 cached) needs 256 KV cache blocks of 16 (2048 new + 2048 cached tokens), the pool holds "
        f'255; raise "num_blocks" to at least 257 (from the plan\'s builtin block and {mc})\n'
    )
    assert list(tmp_path.iterdir()) == [mc]


@pytest.mark.parametrize("suffix", ["", "/"])
def test_report_path_that_is_a_directory_fails_before_the_warmup(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--report DIR (probe D5) fails before any step runs."""
    argv = ["run", SMOKE, "--device", "cpu", "--report", f"{tmp_path}{suffix}"]
    argv += ["--cache-root", str(tmp_path / "c")]
    assert main(argv) == 1
    why = "is a directory" + (" (the path ends in '/')" if suffix else "")
    assert capsys.readouterr().err == (
        f"warmplan: error: --report {tmp_path}{suffix}: cannot write the report there: {why}\n"
    )
    assert not (tmp_path / "c").exists()


def test_step_failure_survives_an_unwritable_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed step whose partial report cannot be written (probe D4: full disk)
    still exits 2 with the step's error; the lost report is a warning."""
    plan = tmp_path / "p.yaml"
    plan.write_text(
        "version: 1\nname: p\nbuiltin: {num_layers: 1, max_num_tokens: 16, max_num_batched_tokens: 16, compile_sizes: [8]}\n"
        "steps:\n  - {id: t, kind: autotune, backend: builtin, run: {shape: plain, tokens: 8}, "
        "cache: {policy: load_only, on_missing: fail}}\n"
    )

    def full_disk(self: Report, path: str) -> None:
        raise UserError(f"cannot write the report {path}: No space left on device")

    monkeypatch.setattr(Report, "write", full_disk)
    report = tmp_path / "r.json"
    argv = [
        "run",
        str(plan),
        "--device",
        "cpu",
        "--report",
        str(report),
        "--cache-root",
        str(tmp_path / "c"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        err[-2] == f"warmplan: warning: cannot write the report {report}: No space left on device"
    )
    assert err[-1] == (
        "warmplan: error: rank 0, step 't': no usable autotune cache on rank 0 and on_missing=fail: "
        f"rank 0: no cache file at {tmp_path}/c/autotune/builtin/1/cpu/767f93b25ef3f9e6.json"
    )


def test_no_traceback_for_a_5000_digit_integer_in_many_files(tmp_path: Path) -> None:
    """validate over 20 files, one with a 5000-digit integer (probe D2), reports
    every file (the process pool included) without a traceback."""
    for i in range(20):
        (tmp_path / f"f{i:02}.yaml").write_text(
            "version: 1\nname: d\nsteps: [{id: s, kind: slot_mapping, tokens: [1]}, {id: s, kind: slot_mapping, tokens: [2]}]\n"
        )
    (tmp_path / "big.yaml").write_text(
        "version: 1\nname: b\nsteps: [{id: s, kind: slot_mapping, tokens: [" + "9" * 5000 + "]}]\n"
    )
    files = sorted(str(p) for p in tmp_path.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "warmplan", "validate", *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert (
        f"{tmp_path}/big.yaml:3:46: an integer of 5000 characters; plans hold integers of at most 64"
        in lines
    )
    assert sum("duplicate step id 's'" in line for line in lines) == 20


def test_compile_locks_are_bounded_by_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Across ranks, inductor's file-lock wait becomes the plan's longest timeout
    (probe D8: a hung peer holding a lock stalled the others for torch's 600 s)."""
    import importlib

    from warmplan.commands._common import bound_compile_locks

    codecache = importlib.import_module("torch._inductor.codecache")
    monkeypatch.setattr(codecache, "LOCK_TIMEOUT", codecache.LOCK_TIMEOUT)
    monkeypatch.delenv("TORCHINDUCTOR_FILE_LOCK_TIMEOUT", raising=False)
    bound_compile_locks(45.2)
    assert os.environ["TORCHINDUCTOR_FILE_LOCK_TIMEOUT"] == "46"
    assert codecache.LOCK_TIMEOUT == 46


def test_an_operators_lock_timeout_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCHINDUCTOR_FILE_LOCK_TIMEOUT set by the operator wins."""
    from warmplan.commands._common import bound_compile_locks

    monkeypatch.setenv("TORCHINDUCTOR_FILE_LOCK_TIMEOUT", "900")
    bound_compile_locks(45)
    assert os.environ["TORCHINDUCTOR_FILE_LOCK_TIMEOUT"] == "900"


def test_a_bug_is_one_line_and_exit_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unexpected exception (a bug) is one line and exit 3, not a traceback."""
    from warmplan.commands import validate

    def broken(args: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(validate, "run", broken)
    assert main(["validate", DENSE]) == 3
    assert capsys.readouterr().err == (
        "warmplan: internal error: RuntimeError: boom (a bug in warmplan; --log-level debug shows where)\n"
    )


def test_sigterm_unwinds_like_ctrl_c(capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM raises where the process is, so cleanup runs, and exits 143."""
    import signal

    from warmplan.commands import validate

    def killed(args: object) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validate, "run", killed)
        assert main(["validate", DENSE]) == 143
    assert capsys.readouterr().err == "warmplan: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-format", "json", "validate", "p.yaml"],
        ["validate", "p.yaml", "--log-format", "json"],
    ],
)
def test_common_options_count_before_or_after_the_command(argv: list[str]) -> None:
    """`warmplan --log-format json run ...` is not silently reset to console by the
    subcommand's default."""
    from warmplan.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.log_format, args.log_level) == ("json", "info")


def test_ctrl_c_mid_step_restores_the_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C (or SIGTERM, which unwinds the same way) inside a step leaves the
    runner's buffers as they were before the step."""
    from warmplan.executor import run_plan
    from warmplan.plan import parse_plan
    from warmplan.testing import RecordingWorker

    worker = RecordingWorker(platform="cpu")
    before = {k: list(v) for k, v in worker.buffers.items()}
    touched = worker.dummy_run

    def interrupted(*args: object, **kwargs: object) -> None:
        touched(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(worker, "dummy_run", interrupted)
    plan = parse_plan(
        "version: 1\nname: t\nsteps:\n  - {id: d, kind: dummy_run, shape: plain, tokens: 8}\n"
    )
    with pytest.raises(KeyboardInterrupt):
        run_plan(plan, worker)
    assert len(worker.calls_named("dummy_run")) == 1
    assert worker.buffers == before
