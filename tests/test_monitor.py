"""The JIT monitor on CPU with torch.compile, and on a GPU with Triton."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
import torch._dynamo

from warmplan.errors import WarmplanError
from warmplan.monitor import CompileEvent, JitCompileError, JitMonitor


@pytest.fixture(autouse=True)
def _fresh_dynamo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(backend: str = "aot_eager") -> Callable[[torch.Tensor], torch.Tensor]:
    def tiny(x: torch.Tensor) -> torch.Tensor:
        return (x * 2).sin().sum()

    return torch.compile(tiny, backend=backend, dynamic=False)


def test_counts_one_compile_per_new_static_shape() -> None:
    """Each new shape is one dynamo compile; a repeated shape is none."""
    fn = _compiled()
    with JitMonitor() as monitor:
        for n in (2, 3, 3, 4):
            fn(torch.ones(n))
    assert monitor.compiles() == 3
    assert [e.kind for e in monitor.events] == ["dynamo"] * 3


def test_event_names_the_function_and_its_shapes() -> None:
    """A dynamo event carries the compiled function's name and its argument shapes."""
    fn = _compiled()
    with JitMonitor() as monitor:
        fn(torch.ones(5))
    (event,) = monitor.events
    assert event.name == "tiny"
    assert event.key == "x=float32[5]"
    assert event.cache_hit is False
    assert event.duration_s is not None
    assert event.duration_s > 0


def test_attribute_labels_events() -> None:
    """Events get the label of the innermost attribute block in progress."""
    fn = _compiled()
    with JitMonitor() as monitor:
        with monitor.attribute("warm"):
            fn(torch.ones(2))
            fn(torch.ones(2))
        with monitor.attribute("outer"), monitor.attribute("batch[1]"):
            fn(torch.ones(7))
        fn(torch.ones(8))
    assert monitor.compiles("warm") == 1
    assert monitor.compiles("batch[1]") == 1
    assert monitor.compiles("outer") == 0
    assert [e.label for e in monitor.events] == ["warm", "batch[1]", None]


def test_eager_fallback_past_recompile_limit_counts_as_compile() -> None:
    """A frame past the recompile limit falls back to eager: one eager_fallback event."""
    fn = _compiled()
    with torch._dynamo.config.patch(recompile_limit=1), JitMonitor() as monitor:
        with monitor.attribute("b0"):
            fn(torch.ones(2))
        with monitor.attribute("b1"):
            fn(torch.ones(3))
        with monitor.attribute("b2"):
            fn(torch.ones(4))
    kinds = [(e.kind, e.label) for e in monitor.events]
    assert kinds == [("dynamo", "b0"), ("eager_fallback", "b1")]
    fallback = monitor.events[1]
    assert fallback.name == "tiny"
    assert "size mismatch" in fallback.key
    assert monitor.compiles() == 2


def test_eager_fallback_counted_when_dynamo_logging_is_silenced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With dynamo's warnings silenced, the fallback is still counted from its counters."""
    monkeypatch.setattr(logging.getLogger("torch._dynamo.convert_frame"), "disabled", True)
    fn = _compiled()
    with torch._dynamo.config.patch(recompile_limit=1), JitMonitor() as monitor:
        fn(torch.ones(2))
        with monitor.attribute("b1"):
            fn(torch.ones(3))
    assert [(e.kind, e.label) for e in monitor.events] == [
        ("dynamo", None),
        ("eager_fallback", "b1"),
    ]
    assert monitor.events[1].name == "<unknown>"


def test_inductor_disk_cache_load_is_not_a_compile() -> None:
    """A graph loaded from inductor's on-disk cache is a cache load, not a compile."""
    with JitMonitor() as monitor:
        with monitor.attribute("cold"):
            _compiled("inductor")(torch.ones(4))
        torch._dynamo.reset()
        with monitor.attribute("warm-disk"):
            _compiled("inductor")(torch.ones(4))
    assert (monitor.compiles("cold"), monitor.cache_loads("cold")) == (1, 0)
    assert (monitor.compiles("warm-disk"), monitor.cache_loads("warm-disk")) == (0, 1)


def test_off_mode_does_not_log() -> None:
    """Before arming (mode off) compiles are counted silently."""
    with structlog.testing.capture_logs() as logs, JitMonitor() as monitor:
        _compiled()(torch.ones(3))
    assert monitor.compiles() == 1
    assert logs == []


def test_warn_mode_logs_each_compile_with_hint() -> None:
    """Armed warn: every compile is logged with its name, key, label and hint."""
    fn = _compiled()
    monitor = JitMonitor(hint=lambda e: f"cover {e.key}")
    with monitor:
        fn(torch.ones(2))
        monitor.arm("warn")
        with structlog.testing.capture_logs() as logs, monitor.attribute("batch[0]"):
            fn(torch.ones(2))
            fn(torch.ones(6))
    assert len(logs) == 1
    (entry,) = logs
    assert entry["event"] == "jit_compile_after_warmup"
    assert entry["log_level"] == "warning"
    assert entry["name"] == "tiny"
    assert entry["key"] == "x=float32[6]"
    assert entry["label"] == "batch[0]"
    assert entry["hint"] == "cover x=float32[6]"


def test_error_mode_raises_at_end_of_attribute_block() -> None:
    """Armed error: a compile raises JitCompileError naming kernel, key, label and hint."""
    fn = _compiled()
    monitor = JitMonitor(hint=lambda e: "add a dummy_run of 6 tokens")
    with monitor:
        with monitor.attribute("warmup"):
            fn(torch.ones(2))
        monitor.arm("error")
        with monitor.attribute("batch[0]"):
            fn(torch.ones(2))  # covered: no error
        with pytest.raises(JitCompileError) as caught, monitor.attribute("batch[1]"):
            fn(torch.ones(6))
    error = caught.value
    assert isinstance(error, WarmplanError)
    assert error.exit_code == 2
    assert error.event.label == "batch[1]"
    assert str(error) == (
        "JIT compilation after warmup: torch.compile of 'tiny' key 'x=float32[6]' "
        "during 'batch[1]'; add a dummy_run of 6 tokens"
    )


def test_error_mode_check_raises_outside_attribute_and_only_once() -> None:
    """A compile outside any attribute block is raised by check(), once."""
    fn = _compiled()
    monitor = JitMonitor(mode="error")
    monitor.install()
    try:
        fn(torch.ones(3))
        with pytest.raises(JitCompileError, match="'x=float32\\[3\\]'"):
            monitor.check()
        monitor.check()
    finally:
        monitor.uninstall()


def test_error_mode_does_not_raise_for_cache_loads() -> None:
    """Armed error: a load from the on-disk cache is logged, not raised."""
    with JitMonitor() as monitor:
        _compiled("inductor")(torch.ones(4))
        torch._dynamo.reset()
        monitor.arm("error")
        with monitor.attribute("b"):
            _compiled("inductor")(torch.ones(4))
    assert monitor.cache_loads("b") == 1


def test_exit_raises_pending_error() -> None:
    """Leaving the monitor's with-block raises a compile still pending."""
    fn = _compiled()
    with pytest.raises(JitCompileError), JitMonitor(mode="error"):
        fn(torch.ones(3))


def test_survives_dynamo_reset() -> None:
    """torch._dynamo.reset() drops callbacks; attribute() registers them again."""
    fn = _compiled()
    with JitMonitor() as monitor:
        torch._dynamo.reset()
        with monitor.attribute("after-reset"):
            fn(torch.ones(3))
    assert monitor.compiles("after-reset") == 1


def test_uninstall_stops_counting_and_removes_callbacks() -> None:
    """After uninstall nothing is recorded and dynamo holds none of its callbacks."""
    fn = _compiled()
    monitor = JitMonitor()
    monitor.install()
    monitor.install()  # idempotent
    fn(torch.ones(2))
    monitor.uninstall()
    fn(torch.ones(3))
    assert monitor.compiles() == 1
    from torch._dynamo.callback import callback_handler as handler

    assert monitor.dynamo.on_start not in handler.start_callbacks
    assert monitor.dynamo.on_end not in handler.end_callbacks


def test_invalid_mode_is_rejected() -> None:
    """A mode outside off|warn|error names the valid ones."""
    with pytest.raises(ValueError, match="off, warn, error: 'loud'"):
        JitMonitor(mode="loud")  # type: ignore[arg-type]


def test_broken_hint_does_not_hide_the_compile() -> None:
    """A hint that raises still lets the compile be reported."""

    def hint(event: CompileEvent) -> str:
        raise RuntimeError("boom")

    fn = _compiled()
    monitor = JitMonitor(mode="error", hint=hint)
    with pytest.raises(JitCompileError, match="hint failed"), monitor:
        fn(torch.ones(3))


# -- Triton (needs a GPU) ---------------------------------------------------------

_no_cuda = not torch.cuda.is_available()


def _triton_kernel() -> Any:
    import triton
    import triton.language as tl

    # No annotations but constexpr: Triton resolves them as globals of the kernel.
    @triton.jit  # type: ignore[untyped-decorator]
    def _wp_add_one(x_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

    return _wp_add_one


@pytest.mark.gpu
@pytest.mark.skipif(_no_cuda, reason="needs a CUDA GPU")
def test_triton_counts_a_compile_per_specialisation() -> None:
    """n == 1, n % 16 == 0 and other n are three Triton variants; repeats compile nothing."""
    kernel = _triton_kernel()
    x = torch.zeros(64, device="cuda")
    with JitMonitor() as monitor:
        for label, n in (("n1", 1), ("n16", 16), ("n17", 17), ("n32", 32), ("n19", 19)):
            with monitor.attribute(label):
                kernel[(1,)](x, n, BLOCK=64)
        torch.cuda.synchronize()
    assert [monitor.compiles(label) for label in ("n1", "n16", "n17", "n32", "n19")] == [
        1,
        1,
        1,
        0,
        0,
    ]
    assert {e.name for e in monitor.events} == {"_wp_add_one"}
    assert all(e.kind == "triton" for e in monitor.events)
    keys = {e.label: e.key for e in monitor.events}
    assert keys["n1"].startswith("x_ptr:*fp32/16, n=1, ")
    assert keys["n16"] == "x_ptr:*fp32/16, n:i32/16, BLOCK=64"
    assert keys["n17"] == "x_ptr:*fp32/16, n:i32, BLOCK=64"


@pytest.mark.gpu
@pytest.mark.skipif(_no_cuda, reason="needs a CUDA GPU")
def test_triton_disk_cache_load_and_hook_chaining() -> None:
    """A kernel loaded from Triton's disk cache is a load; hooks set before are chained and restored."""
    import triton

    seen: list[bool] = []

    def previous_listener(**kwargs: Any) -> None:
        seen.append(bool(kwargs["cache_hit"]))

    knobs: Any = triton.knobs
    knobs.compilation.listener = previous_listener
    try:
        x = torch.zeros(64, device="cuda")
        with JitMonitor() as monitor:
            with monitor.attribute("cold"):
                _triton_kernel()[(1,)](x, 5, BLOCK=32)
            with monitor.attribute("disk"):
                _triton_kernel()[(1,)](x, 5, BLOCK=32)  # a new JITFunction: memory cache empty
            torch.cuda.synchronize()
        assert (monitor.compiles("cold"), monitor.cache_loads("cold")) == (1, 0)
        assert (monitor.compiles("disk"), monitor.cache_loads("disk")) == (0, 1)
        assert seen == [False, True]
        assert knobs.compilation.listener is previous_listener
        assert knobs.runtime.jit_post_compile_hook is None
    finally:
        knobs.compilation.listener = None


@pytest.mark.gpu
@pytest.mark.skipif(_no_cuda, reason="needs a CUDA GPU")
def test_triton_error_mode_raises_after_the_launch() -> None:
    """Armed error: a Triton compile raises JitCompileError when the block ends."""
    kernel = _triton_kernel()
    x = torch.zeros(64, device="cuda")
    with JitMonitor() as monitor:
        kernel[(1,)](x, 1, BLOCK=64)
        monitor.arm("error")
        with (
            pytest.raises(JitCompileError, match="triton kernel '_wp_add_one'"),
            monitor.attribute("b"),
        ):
            kernel[(1,)](x, 7, BLOCK=64)


@pytest.mark.gpu
@pytest.mark.skipif(_no_cuda, reason="needs a CUDA GPU")
def test_inductor_triton_kernels_fold_into_the_dynamo_event() -> None:
    """Triton kernels inductor compiles for a graph are part of that one dynamo event."""
    fn = _compiled("inductor")
    with JitMonitor() as monitor:
        fn(torch.ones(8, device="cuda"))
        torch.cuda.synchronize()
    assert [e.kind for e in monitor.events] == ["dynamo"]
    assert monitor.compiles() == 1


# -- Triton hooks against a stand-in module (runs everywhere) ---------------------


class _Namespace:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A ``triton`` module holding only the knobs the monitor hooks."""
    knobs = _Namespace(
        compilation=_Namespace(listener=None),
        runtime=_Namespace(jit_post_compile_hook=None),
    )
    module = _Namespace(knobs=knobs, __name__="triton")
    monkeypatch.setitem(__import__("sys").modules, "triton", module)
    return knobs


def _src(n_kind: str = "i32") -> Any:
    return _Namespace(
        name="_slot_kernel",
        signature={"x_ptr": "*i64", "n": n_kind, "BLOCK": "constexpr"},
        constexprs={(2,): 64},
        attrs={(0,): [["tt.divisibility", 16]], (1,): []},
    )


def _compile(knobs: Any, *, cache_hit: bool, src: Any = None) -> None:
    """What triton.compile and JITFunction.run do: the listener, then the post-compile hook."""
    knobs.compilation.listener(
        src=src or _src(),
        metadata={"name": "_slot_kernel", "hash": "ab" * 32},
        metadata_group={},
        times=_Namespace(total=2500),
        cache_hit=cache_hit,
    )
    hook = knobs.runtime.jit_post_compile_hook
    if hook is not None:
        hook(
            key="(('*i64', 'D'), ('i32', ''))",
            repr="_slot_kernel[...]",
            fn=_Namespace(name="_slot_kernel"),
            compile={},
            is_manual_warmup=False,
            already_compiled=False,
            new_in_3_7=True,
        )


def test_triton_listener_records_compiles_and_loads_by_name(fake_triton: Any) -> None:
    """The listener's cache_hit tells a compile from a disk load; the key names each argument."""
    with JitMonitor() as monitor:
        with monitor.attribute("cold"):
            _compile(fake_triton, cache_hit=False)
        with monitor.attribute("disk"):
            _compile(fake_triton, cache_hit=True)
    assert [(e.kind, e.label, e.cache_hit) for e in monitor.events] == [
        ("triton", "cold", False),
        ("triton", "disk", True),
    ]
    event = monitor.events[0]
    assert (event.name, event.key, event.duration_s) == (
        "_slot_kernel",
        "x_ptr:*i64/16, n:i32, BLOCK=64",
        0.0025,
    )


def test_triton_hooks_chain_to_previous_and_restore(fake_triton: Any) -> None:
    """Hooks installed before are still called, with every argument, and come back on uninstall."""
    calls: list[str] = []

    def listener(**kwargs: Any) -> None:
        calls.append(f"listener cache_hit={kwargs['cache_hit']}")

    def post_hook(**kwargs: Any) -> bool:
        calls.append(f"post new_in_3_7={kwargs['new_in_3_7']}")
        return True

    fake_triton.compilation.listener = listener
    fake_triton.runtime.jit_post_compile_hook = post_hook
    with JitMonitor() as monitor:
        assert fake_triton.compilation.listener is not listener
        _compile(fake_triton, cache_hit=False)
    assert calls == ["listener cache_hit=False", "post new_in_3_7=True"]
    assert monitor.compiles() == 1
    assert fake_triton.compilation.listener is listener
    assert fake_triton.runtime.jit_post_compile_hook is post_hook


def test_triton_hook_installed_later_is_left_in_place(fake_triton: Any) -> None:
    """A hook someone installed after the monitor stays; the monitor's own is inert once uninstalled."""
    monitor = JitMonitor()
    monitor.install()
    ours = fake_triton.compilation.listener

    def later(**kwargs: Any) -> None:
        ours(**kwargs)

    fake_triton.compilation.listener = later
    monitor.uninstall()
    assert fake_triton.compilation.listener is later
    _compile(fake_triton, cache_hit=False)
    assert monitor.events == []


def test_triton_error_mode_raises_after_the_hook_not_inside_it(fake_triton: Any) -> None:
    """Armed error: the hook returns normally; the error comes at the end of the block."""
    src = _src("constexpr")
    src.constexprs = {(1,): 1, (2,): 64}  # n == 1 is its own variant, a constexpr
    returned: list[bool] = []

    def launch() -> None:
        _compile(fake_triton, cache_hit=False, src=src)
        returned.append(True)

    expected = (
        "triton kernel '_slot_kernel' key 'x_ptr:\\*i64/16, n=1, BLOCK=64' during 'batch\\[0\\]'"
    )
    with JitMonitor(mode="error") as monitor:
        with pytest.raises(JitCompileError, match=expected), monitor.attribute("batch[0]"):
            launch()
        assert returned == [True]


def test_triton_compiles_inside_torch_compile_fold_into_its_event(
    fake_triton: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton kernels a backend compiles for a graph are part of that one dynamo event."""

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        _compile(fake_triton, cache_hit=False)  # as inductor compiles the graph's kernels
        _compile(fake_triton, cache_hit=True)
        return gm.forward

    def tiny(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    fn = torch.compile(tiny, backend=backend, dynamic=False)
    with JitMonitor() as monitor:
        monkeypatch.delitem(__import__("sys").modules, "triton")  # torch must not see the stand-in
        fn(torch.ones(3))
        _compile(fake_triton, cache_hit=False)  # a launch outside any compile: its own event
    assert [(e.kind, e.name, e.cache_hit) for e in monitor.events] == [
        ("dynamo", "tiny", False),
        ("triton", "_slot_kernel", False),
    ]


def test_triton_without_listener_counts_from_the_post_compile_hook(fake_triton: Any) -> None:
    """Knobs without a compilation listener: each post-compile hook call is a compile."""
    del fake_triton.compilation.listener
    with JitMonitor() as monitor, monitor.attribute("b"):
        fake_triton.runtime.jit_post_compile_hook(
            key="(('*i64', 'D'),)",
            fn=_Namespace(name="_k"),
            compile={},
            is_manual_warmup=False,
            already_compiled=False,
        )
    assert [(e.kind, e.name, e.key, e.label) for e in monitor.events] == [
        ("triton", "_k", "(('*i64', 'D'),)", "b")
    ]
    assert fake_triton.runtime.jit_post_compile_hook is None
