"""Test helpers shipped with warmplan, for its own tests and its users'.

``RecordingWorker`` implements the Worker protocol and records every call made on
it; ``run_plan_text`` runs plan YAML on one and returns it::

    worker = run_plan_text(yaml_text, max_num_tokens=8)
    assert worker.calls == [Call("slot_mapping", {"num_tokens": 1}), ...]

The recording worker keeps a few named "runner buffers" (plain lists) that its
calls mutate while they run, so that tests can prove ``preserve_state`` restores
them, and ``fail_on`` makes the n-th call of a method raise.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from warmplan.dist import LocalWorld, World
from warmplan.workers.base import (
    AutotuneBackend,
    Batch,
    Facts,
    Limits,
    Shape,
    WorkerInfo,
)


@dataclass(frozen=True, slots=True)
class Call:
    """One recorded call: the method's name and its arguments."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)


class InjectedFailure(RuntimeError):
    """Raised by ``RecordingWorker`` where ``fail_on`` says so."""


class RecordingWorker:
    """A Worker that records every call; limits, facts and world are settable."""

    def __init__(
        self,
        *,
        max_num_tokens: int = 8192,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 256,
        platform: str = "cuda",
        device_capability: tuple[int, int] | None = (9, 0),
        attention_backends: tuple[str, ...] = ("BUILTIN_SPARSE_MLA",),
        pooling: bool = False,
        flags: Mapping[str, bool] | None = None,
        env: Mapping[str, str] | None = None,
        world: World | None = None,
        backends: Mapping[str, AutotuneBackend] | None = None,
        fail_on: Mapping[str, int] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self._limits = Limits(max_num_tokens=max_num_tokens, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
        self._facts = Facts(
            platform=platform,
            device_capability=device_capability if platform == "cuda" else None,
            attention_backends=attention_backends,
            pooling=pooling,
            flags=dict(flags or {}),
            env=dict(env or {}),
        )
        self._world = world or LocalWorld()
        self._backends = dict(backends or {})
        self._fail_on = dict(fail_on or {})
        self._counts: dict[str, int] = {}
        self._config = dict(config or {"model": "recording", "layers": 1})
        self.calls: list[Call] = []
        self.buffers: dict[str, list[int]] = {"positions": [0] * 16, "query_start_loc": [0, 0], "slot_mapping": [0] * 16}

    # -- protocol -----------------------------------------------------------------
    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def facts(self) -> Facts:
        return self._facts

    @property
    def world(self) -> World:
        return self._world

    def describe(self) -> WorkerInfo:
        return WorkerInfo(engine="recording", device="none", versions={"torch": None, "triton": None, "flashinfer": None})

    def config_fingerprint(self) -> Mapping[str, Any]:
        return dict(self._config)

    def slot_mapping(self, num_tokens: int) -> None:
        self._touch("slot_mapping", num_tokens)
        self.calls.append(Call("slot_mapping", {"num_tokens": num_tokens}))
        self._maybe_fail("slot_mapping")

    def dummy_run(self, shape: Shape, num_tokens: int, *, prior_context: int = 0, force_attention: bool = False) -> None:
        self._touch("dummy_run", num_tokens)
        self.calls.append(Call("dummy_run", {"shape": shape, "num_tokens": num_tokens, "prior_context": prior_context, "force_attention": force_attention}))
        self._maybe_fail("dummy_run")

    def execute(self, batch: Batch) -> None:
        self._touch("execute", batch.num_tokens)
        self.calls.append(Call("execute", {"batch": batch}))
        self._maybe_fail("execute")

    @contextlib.contextmanager
    def preserve_state(self) -> Iterator[None]:
        saved = copy.deepcopy(self.buffers)
        try:
            yield
        finally:
            self.buffers = saved

    def synchronize(self) -> None:
        self.calls.append(Call("synchronize"))

    def autotune_backend(self, name: str) -> AutotuneBackend | None:
        return self._backends.get(name)

    # -- helpers ------------------------------------------------------------------
    def calls_named(self, *names: str) -> list[Call]:
        """The recorded calls of these methods, in order (all but synchronize by default)."""
        wanted = set(names) if names else {"slot_mapping", "dummy_run", "execute"}
        return [c for c in self.calls if c.name in wanted]

    def _touch(self, what: str, n: int) -> None:
        # Mutate buffers the way a runner would, so restoring them is observable.
        self.buffers["query_start_loc"] = [0, n]
        self.buffers["positions"] = list(range(max(16, n)))[:16]
        self.buffers["slot_mapping"] = [n] * 16

    def _maybe_fail(self, name: str) -> None:
        self._counts[name] = self._counts.get(name, 0) + 1
        if self._fail_on.get(name) == self._counts[name]:
            raise InjectedFailure(f"injected failure in {name} call {self._counts[name]}")


def run_plan_text(text: str, worker: RecordingWorker | None = None, **worker_kwargs: Any) -> RecordingWorker:
    """Run plan YAML ``text`` on a ``RecordingWorker`` (made from ``worker_kwargs``)."""
    from warmplan.executor import run_plan
    from warmplan.plan import parse_plan

    worker = worker or RecordingWorker(**worker_kwargs)
    run_plan(parse_plan(text), worker)
    return worker
