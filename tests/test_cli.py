"""The command line: plan, schema, log formats, exit codes, no tracebacks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests._paths import PLANS, ROOT
from warmplan.cli import main
from warmplan.schema import schema_text

DSV4 = str(PLANS / "dsv4.yaml")


def plan(tokens: int, batched: int, *extra: str, file: str = DSV4) -> int:
    """``warmplan plan FILE --max-num-tokens T --max-num-batched-tokens B EXTRA...``."""
    return main(
        [
            "plan",
            file,
            "--max-num-tokens",
            str(tokens),
            "--max-num-batched-tokens",
            str(batched),
            *extra,
        ]
    )


def test_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    """warmplan plan --json gives steps with requested/applied tokens, skips and cache paths."""
    code = plan(
        8,
        2048,
        "--attention-backend",
        "V4_FLASHMLA_SPARSE",
        "--device-capability",
        "12.0",
        "--flag",
        "enable_flashinfer_autotune=true",
        "--cache-root",
        "/c",
        "--json",
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    steps = {s["id"]: s for s in out["steps"]}
    assert steps["slot-mapping"]["requested_tokens"][-1] == 512
    assert steps["slot-mapping"]["applied_tokens"] == list(range(1, 9))
    assert steps["sparse-mla-second-chunk"]["applied_tokens"] == [2048]
    assert steps["sparse-mla-second-chunk"]["prior_context"] == 2048
    assert steps["sparse-mla-mixed"]["replaced_by"] == "sparse-mla-decode-autotune"
    # No worker here, so the backend version is unknown.
    assert (
        steps["flashinfer-autotune"]["cache_path"]
        == f"/c/autotune/flashinfer/unknown/sm120/{steps['flashinfer-autotune']['config_hash']}.json"
    )
    assert [s["id"] for s in out["steps"] if s["skipped"] is not None] == [
        s["id"] for s in out["steps"] if s["id"].startswith("builtin-")
    ]


def test_plan_table_shows_skips(capsys: pytest.CaptureFixture[str]) -> None:
    """The table names every step and why it is skipped."""
    assert plan(8, 16, "--platform", "cpu") == 0
    out = capsys.readouterr().out
    assert "slot-mapping" in out and "gate platform: needs cuda, worker is cpu" in out
    assert "gate attention_backend" in out


def test_plan_env_option_turns_warmup_off(capsys: pytest.CaptureFixture[str]) -> None:
    """--env sets what the env gates read."""
    plan(
        8,
        16,
        "--attention-backend",
        "DEEPSEEK_SPARSE_SWA",
        "--env",
        "VLLM_ENABLE_DEEPSEEK_V4_SPARSE_MLA_WARMUP=0",
        "--json",
    )
    steps = {s["id"]: s for s in json.loads(capsys.readouterr().out)["steps"]}
    assert (
        steps["sparse-mla-decode-autotune"]["skipped"]
        == "gate env: VLLM_ENABLE_DEEPSEEK_V4_SPARSE_MLA_WARMUP='0' is false"
    )


def test_bad_plan_exit_1_no_traceback(
    write_plan: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad plan given to plan exits 1 with the file:line message only."""
    bad = write_plan("version: 1\nname: x\nsteps: [{id: a, kind: slot_mapping}]\n")
    assert plan(8, 8, file=str(bad)) == 1
    err = capsys.readouterr().err
    assert err == f"{bad}:3:9: steps[0]: missing required key 'tokens'\n"


def test_bad_flag_value(capsys: pytest.CaptureFixture[str]) -> None:
    """An unsatisfiable option is a user error, exit 1."""
    assert plan(8, 8, "--flag", "x=maybe") == 1
    assert capsys.readouterr().err == "warmplan: error: --flag x=maybe: expected true or false\n"


def test_schema_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """warmplan schema prints the path and the schema; --write writes it."""
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first == f"# {ROOT / 'schemas' / 'plan.schema.json'}"
    assert rest == schema_text()
    assert main(["schema", "--write", str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "s.json").read_text() == schema_text()


def test_json_logs(capsys: pytest.CaptureFixture[str], write_plan: Callable[..., Path]) -> None:
    """With --log-format json every log line is one JSON object."""
    from warmplan.executor import run_plan
    from warmplan.log import configure
    from warmplan.plan import load_plan
    from warmplan.testing import RecordingWorker

    configure("json")
    try:
        run_plan(
            load_plan(
                write_plan(
                    "version: 1\nname: t\nsteps: [{id: a, kind: slot_mapping, tokens: [1, 9]}]\n"
                )
            ),
            RecordingWorker(max_num_tokens=4),
        )
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        configure("console")
    events = [e["event"] for e in lines]
    assert events == ["plan.start", "step.start", "step.done", "plan.done"]
    start = lines[1]
    assert (
        start["step"] == "a"
        and start["requested"] == [1, 9]
        and start["applied"] == [1, 4]
        and start["clamped"] == {"9": 4}
    )


def test_model_config_errors_name_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --model-config is checked like a plan's builtin block: file:line:column, key, hint; exit 1."""
    bad = tmp_path / "model.yaml"
    bad.write_text("num_layerz: 3\ndtype: float64\n")
    assert main(["run", str(PLANS / "builtin-smoke.yaml"), "--model-config", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(
        f"{bad}:1:1: num_layerz: unknown key 'num_layerz' (did you mean 'num_layers'?); expected one of preset, num_layers,"
    )
    assert (
        err[1]
        == f"{bad}:2:8: dtype: expected one of auto, float32, bfloat16, float16, found 'float64' (did you mean 'float16'?)"
    )
