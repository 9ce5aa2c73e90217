"""Reliability and security of the paths warmplan's settings name: a report path,
and the vLLM plugin's environment variables, cannot be turned by another user into
writes or reads of files they choose (the cases need root to plant files owned by
someone else; as another user they are skipped)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from warmplan import fsutil
from warmplan.errors import UserError
from warmplan.report import Report

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root")
OTHER_UID = 12345


def _report() -> Report:
    return Report(plan={"name": "p"}, worker={"engine": "x"})


@ROOT_ONLY
def test_report_through_another_users_link_is_refused(tmp_path: Path) -> None:
    """A link planted at the report path by another user (WARMPLAN_REPORT=/tmp/r.json)
    is not followed: the file it names is untouched, the error names the owner."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "r.json"
    link.symlink_to(victim)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(UserError) as info:
        _report().write(link)
    assert str(info.value) == (
        f"cannot write the report {link}: a symbolic link owned by uid {OTHER_UID}, neither "
        f"this user (0) nor root; warmplan does not follow or write through it"
    )
    assert victim.read_text() == "precious"
    assert fsutil.check_writable(link) == (
        f"a symbolic link owned by uid {OTHER_UID}, neither this user (0) nor root; "
        "warmplan does not follow or write through it"
    )


@ROOT_ONLY
def test_report_into_another_users_fifo_is_refused(tmp_path: Path) -> None:
    """A FIFO planted by another user at the report path does not receive the report."""
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    os.chown(fifo, OTHER_UID, OTHER_UID)
    with pytest.raises(UserError, match="a special file owned by uid 12345"):
        _report().write(fifo)


def test_own_link_is_still_followed(tmp_path: Path) -> None:
    """A link the user made (report.json -> reports/today.json) is followed, kept."""
    (tmp_path / "today.json").write_text("")
    (tmp_path / "r.json").symlink_to(tmp_path / "today.json")
    _report().write(tmp_path / "r.json")
    assert (tmp_path / "today.json").read_text().startswith("{")
    assert (tmp_path / "r.json").is_symlink()


@ROOT_ONLY
@pytest.mark.parametrize(
    ("owner", "mode", "why"),
    [
        (OTHER_UID, 0o644, f"owned by uid {OTHER_UID}, neither this user (0) nor root"),
        (0, 0o666, "writable by other users (mode 666)"),
    ],
)
def test_foreign_owner_says_why_a_plan_file_is_not_trusted(
    tmp_path: Path, owner: int, mode: int, why: str
) -> None:
    """fsutil.foreign_owner: another user's file, or one others can write, is named."""
    plan = tmp_path / "p.yaml"
    plan.write_text("version: 1\n")
    os.chown(plan, owner, owner)
    plan.chmod(mode)
    assert fsutil.foreign_owner(plan) == why


@ROOT_ONLY
def test_plugin_refuses_a_plan_another_user_can_change(tmp_path: Path) -> None:
    """WARMPLAN_PLAN naming a plan another user owns or can write (it decides what
    every vLLM worker runs, with the server's rights) is refused at registration."""
    from warmplan.vllm_plugin.settings import settings as _settings

    plan = tmp_path / "p.yaml"
    plan.write_text("version: 1\nname: p\nsteps: [{id: s, kind: slot_mapping, tokens: [1]}]\n")
    plan.chmod(0o666)
    with pytest.raises(UserError) as info:
        _settings({"WARMPLAN_PLAN": str(plan)})
    assert str(info.value) == (
        f"WARMPLAN_PLAN={plan}: writable by other users (mode 666); a plan decides what every "
        "vLLM worker runs: make it yours (chown) and not writable by others (chmod go-w)"
    )


@ROOT_ONLY
def test_recorder_does_not_follow_another_users_link(tmp_path: Path) -> None:
    """WARMPLAN_RECORD=/tmp/trace.jsonl: a link planted there by another user is not
    followed (it would truncate the file it names)."""
    from warmplan.record import TraceRecorder

    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "trace.jsonl"
    link.symlink_to(victim)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(OSError):  # noqa: PT011 - any refusal will do; the victim is the point
        TraceRecorder(link).close()
    assert victim.read_text() == "precious"


def test_collective_rpc_takes_plan_text_never_a_path() -> None:
    """warmplan_run('/etc/passwd') (probe D11) is a plan error about the text itself;
    the file is never read or echoed."""
    from warmplan.errors import PlanError
    from warmplan.vllm_plugin import WarmplanWorkerExtension

    with pytest.raises(PlanError) as info:
        WarmplanWorkerExtension().warmplan_run("/etc/passwd")
    assert info.value.problems == [
        "<collective_rpc warmplan_run>:1:1: (top level): expected a mapping with version, "
        "name and steps, found '/etc/passwd'"
    ]
