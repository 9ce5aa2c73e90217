"""The resolver: clamping once, dedupe, gates, replaces, cache paths. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests._paths import PLANS
from warmplan.errors import PlanError
from warmplan.plan import load_plan, parse_plan
from warmplan.resolve import (
    CacheContext,
    capability_family_matches,
    env_truthy,
    gate_failure,
    resolve,
)
from warmplan.steps.base import clamp
from warmplan.workers.base import Facts, Limits

DSV4 = load_plan(PLANS / "dsv4.yaml")
SPARSE = ("V4_FLASHMLA_SPARSE",)


def limits(tokens: int = 8192, batched: int = 8192, seqs: int = 256) -> Limits:
    return Limits(max_num_tokens=tokens, max_num_batched_tokens=batched, max_num_seqs=seqs)


def cuda(cap: tuple[int, int] = (9, 0), backends: tuple[str, ...] = SPARSE, **kw: object) -> Facts:
    return Facts(platform="cuda", device_capability=cap, attention_backends=backends, **kw)  # type: ignore[arg-type]


def ctx() -> CacheContext:
    return CacheContext(cache_root="/cache", arch="sm90", config={"model": "m"})


def test_clamp_to_max_num_tokens_dedupes() -> None:
    """With max_num_tokens 8 the fan becomes 1..8, each once, in order."""
    r = resolve(DSV4, limits(tokens=8), cuda(), ctx())
    step = r.step("slot-mapping")
    assert step.requested == (*range(1, 17), 32, 64, 128, 256, 512)
    assert step.applied == tuple(range(1, 9))
    assert step.skipped is None


def test_dummy_runs_clamp_to_batched_tokens_and_same_context() -> None:
    """Prefill sizes clamp to max_num_batched_tokens; prior_context 'same' follows the applied count."""
    r = resolve(DSV4, limits(batched=2048), cuda(), ctx())
    assert r.step("sparse-mla-prefill").applied == (2048,)
    second = r.step("sparse-mla-second-chunk")
    assert (
        second.requested == (8192,) and second.applied == (2048,) and second.prior_context == 2048
    )
    assert r.step("flashinfer-autotune").applied == (2048,)


def test_zero_limit_skips_with_reason() -> None:
    """A step whose applied counts are all 0 is skipped, and says why."""
    r = resolve(DSV4, limits(tokens=0), cuda(), ctx())
    assert (
        r.step("slot-mapping").skipped
        == "every requested token count clamps to 0 (max_num_tokens = 0)"
    )
    assert r.step("slot-mapping").applied == ()


def test_gates_on_cpu() -> None:
    """On a CPU the cuda-gated slot mapping and the capability-gated autotunes skip; dummy runs stay."""
    r = resolve(
        DSV4, limits(), Facts(platform="cpu", attention_backends=("BUILTIN_SPARSE_MLA",)), ctx()
    )
    assert r.step("slot-mapping").skipped == "gate platform: needs cuda, worker is cpu"
    assert (
        r.step("sparse-mla-decode-autotune").skipped
        == "gate device_capability_family: needs 120, worker has no CUDA capability (cpu)"
    )
    assert (
        r.step("flashinfer-autotune").skipped
        == "gate device_capability: needs >= 9.0, worker has no CUDA capability (cpu)"
    )
    assert r.step("sparse-mla-mixed").skipped is None
    assert (
        r.step("sparse-mla-mixed").replaced_by is None
    )  # the autotune step is gated off, so mixed runs


def test_sm120_autotune_replaces_mixed() -> None:
    """On SM120 with the flag on, the decode autotune is active and the mixed step is marked replaceable."""
    r = resolve(DSV4, limits(), cuda((12, 0), flags={"enable_flashinfer_autotune": True}), ctx())
    assert r.step("sparse-mla-decode-autotune").skipped is None
    assert r.step("sparse-mla-mixed").replaced_by == "sparse-mla-decode-autotune"


def test_flag_states() -> None:
    """flashinfer-autotune runs with the flag true or unset, not false."""
    on = resolve(DSV4, limits(), cuda(flags={"enable_flashinfer_autotune": True}), ctx())
    unset = resolve(DSV4, limits(), cuda(), ctx())
    off = resolve(DSV4, limits(), cuda(flags={"enable_flashinfer_autotune": False}), ctx())
    assert on.step("flashinfer-autotune").skipped is None
    assert unset.step("flashinfer-autotune").skipped is None
    assert (
        off.step("flashinfer-autotune").skipped
        == "gate flag: enable_flashinfer_autotune must be true or unset, worker's is false"
    )
    assert (
        unset.step("sparse-mla-decode-autotune").skipped
        == "gate device_capability_family: needs 120, worker is 9.0"
    )


def test_env_gate_unset_means_enabled_and_zero_disables() -> None:
    """The DSv4 env var: unset runs the warmup, 0 turns it off."""
    off = resolve(
        DSV4, limits(), cuda(env={"VLLM_ENABLE_DEEPSEEK_V4_SPARSE_MLA_WARMUP": "0"}), ctx()
    )
    assert (
        off.step("slot-mapping").skipped
        == "gate env: VLLM_ENABLE_DEEPSEEK_V4_SPARSE_MLA_WARMUP='0' is false"
    )
    assert off.step("sparse-mla-prefill").skipped is not None
    on = resolve(
        DSV4, limits(), cuda(env={"VLLM_ENABLE_DEEPSEEK_V4_SPARSE_MLA_WARMUP": "1"}), ctx()
    )
    assert on.step("slot-mapping").skipped is None


def test_pooling_and_other_backend_skip_everything_dsv4() -> None:
    """A pooling model or a non-DSv4 backend skips every DSv4-specific step."""
    pooling = resolve(DSV4, limits(), cuda(pooling=True), ctx())
    assert (
        pooling.step("slot-mapping").skipped
        == "gate pooling: needs a non-pooling model, worker's is pooling"
    )
    other = resolve(DSV4, limits(), cuda(backends=("FLASH_ATTN",)), ctx())
    assert other.step("sparse-mla-mixed").skipped == (
        "gate attention_backend: needs any of V4_FLASHMLA_SPARSE, DEEPSEEK_SPARSE_SWA, BUILTIN_SPARSE_MLA, worker has FLASH_ATTN"
    )


def test_plan_gate_and_disabled() -> None:
    """A failing plan gate skips every step; enabled: false skips one."""
    plan = parse_plan(
        "version: 1\nname: t\nwhen: {platform: cuda}\nsteps:\n"
        "  - {id: a, kind: slot_mapping, tokens: [1]}\n  - {id: b, kind: slot_mapping, tokens: [1], enabled: false}\n"
    )
    r = resolve(plan, limits(), Facts(platform="cpu"), ctx())
    assert [s.skipped for s in r.steps] == ["plan gate platform: needs cuda, worker is cpu"] * 2
    r = resolve(plan, limits(), cuda(), ctx())
    assert [s.skipped for s in r.steps] == [None, "disabled in the plan (enabled: false)"]


def test_cache_path_rendering() -> None:
    """Cache paths render every placeholder and stay under the cache root."""
    plan = parse_plan(
        "version: 1\nname: t\nsteps:\n"
        "  - {id: a, kind: autotune, backend: builtin, run: {shape: plain, tokens: 64},"
        " cache: {path: '{cache_root}/{backend}/{backend_version}/{arch}/{config_hash}-{rank}.json', policy: every_rank}}\n"
    )
    c = CacheContext(
        cache_root="/cache",
        arch="sm90",
        rank=3,
        world_size=4,
        backend_versions={"builtin": "1.0"},
        config={"m": 1},
    )
    step = resolve(plan, limits(), cuda(), c).step("a")
    assert step.cache_path == f"/cache/builtin/1.0/sm90/{step.config_hash}-3.json"
    assert step.config_hash is not None and len(step.config_hash) == 16


def test_config_hash_tracks_what_changes_tuning() -> None:
    """The config hash changes with the model, world size, backend version and run; not with the cache root or rank."""
    plan = parse_plan(
        "version: 1\nname: t\nsteps:\n  - {id: a, kind: autotune, backend: builtin, run: {shape: plain, tokens: 64}}\n"
    )

    def h(**kw: object) -> str | None:
        base: dict[str, object] = {
            "cache_root": "/c",
            "arch": "sm90",
            "config": {"m": 1},
            "backend_versions": {"builtin": "1"},
        }
        base.update(kw)
        return resolve(plan, limits(), cuda(), CacheContext(**base)).step("a").config_hash  # type: ignore[arg-type]

    assert h() == h(cache_root="/elsewhere") == h(rank=1)
    assert (
        len({h(), h(config={"m": 2}), h(world_size=2), h(backend_versions={"builtin": "2"})}) == 4
    )
    assert (
        resolve(plan, limits(batched=32), cuda(), CacheContext(cache_root="/c"))
        .step("a")
        .config_hash
        != resolve(plan, limits(), cuda(), CacheContext(cache_root="/c")).step("a").config_hash
    )


def test_cache_path_cannot_escape_root_through_a_symlink(tmp_path: Path) -> None:
    """A symlinked directory under the cache root (probe D10) is an error naming the
    step: lexically inside is not enough."""
    plan = parse_plan(
        "version: 1\nname: t\nsteps:\n  - {id: a, kind: autotune, backend: builtin, run: {shape: plain, tokens: 64}, cache: {path: '{cache_root}/autotune/x.json'}}\n",
        file="t.yaml",
        path="t.yaml",
    )
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "autotune").symlink_to(tmp_path / "outside")
    with pytest.raises(PlanError) as info:
        resolve(plan, limits(), cuda(), CacheContext(cache_root=str(tmp_path / "root")))
    assert info.value.problems == [
        f"t.yaml:4:94: steps[0].cache.path: renders to {tmp_path}/root/autotune/x.json, which "
        f"resolves to {tmp_path}/outside/x.json through a symbolic link, outside the cache root {tmp_path}/root"
    ]
    assert list((tmp_path / "outside").iterdir()) == []


def test_placeholder_values_cannot_add_path_segments() -> None:
    """A backend version with '/' or '..' cannot move the file out of its folder."""
    plan = parse_plan(
        "version: 1\nname: t\nsteps:\n  - {id: a, kind: autotune, backend: builtin, run: {shape: plain, tokens: 1}}\n"
    )
    c = CacheContext(cache_root="/c", arch="..", backend_versions={"builtin": "../../x"})
    path = resolve(plan, limits(), cuda(), c).step("a").cache_path
    assert path is not None and path.startswith("/c/autotune/builtin/.._.._x/_/")


def test_load_only_without_on_missing_skips_a_missing_cache() -> None:
    """load_only with no on_missing resolves to skip (it never tunes), as the schema describes."""
    plan = parse_plan(
        "version: 1\nname: t\nsteps:\n  - {id: a, kind: autotune, backend: builtin, run: {shape: plain, tokens: 1}, cache: {policy: load_only}}\n"
    )
    step = resolve(plan, limits(), cuda(), ctx()).step("a")
    assert step.as_dict()["on_missing"] == "skip"
    leader = parse_plan(
        "version: 1\nname: t\nsteps:\n  - {id: a, kind: autotune, backend: builtin, run: {shape: plain, tokens: 1}}\n"
    )
    assert resolve(leader, limits(), cuda(), ctx()).step("a").as_dict()["on_missing"] == "tune"


def test_gate_helpers() -> None:
    """env truthiness and capability families follow vLLM."""
    assert (
        not env_truthy("0") and not env_truthy("false") and not env_truthy("") and env_truthy("1")
    )
    assert capability_family_matches((12, 0), 120) and capability_family_matches((12, 1), 120)
    assert not capability_family_matches((10, 0), 120)
    assert gate_failure(DSV4.step("slot-mapping").when, cuda()) is None


@given(
    requested=st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=40),
    limit=st.integers(min_value=0, max_value=10_000),
)
def test_applied_never_exceeds_limit_order_kept(requested: list[int], limit: int) -> None:
    """Applied counts never exceed the limit, are unique, keep first-seen order, and resolving is deterministic."""
    tokens = ", ".join(map(str, requested))
    plan = parse_plan(
        f"version: 1\nname: t\nsteps:\n  - {{id: a, kind: slot_mapping, tokens: [{tokens}]}}\n"
    )
    r1 = resolve(plan, limits(tokens=limit), cuda(), ctx())
    r2 = resolve(plan, limits(tokens=limit), cuda(), ctx())
    assert r1 == r2
    step = r1.step("a")
    expected: list[int] = []
    for n in requested:
        a = clamp(n, limit)
        if a and a not in expected:
            expected.append(a)
    assert list(step.applied) == expected
    assert all(0 < a <= limit for a in step.applied)
    assert (step.skipped is None) == bool(expected)


def test_resolution_problem_of_a_plan_built_in_code_names_the_step_line() -> None:
    """Without the plan's text, a resolution problem still has the file:line:column form."""
    from warmplan.steps.base import ResolveContext
    from warmplan.steps.slot_mapping import SlotMappingStep

    context = ResolveContext(
        limits=limits(),
        facts=cuda(),
        cache=ctx(),
        plan_path=None,
        index=2,
        skipped=None,
        replaced_by=None,
    )
    step = SlotMappingStep(id="a", kind="slot_mapping", tokens=(1,), line=7)
    assert context.error(step, "cache.path", "bad").problems == [
        "<plan>:7:1: steps[2].cache.path: bad"
    ]
