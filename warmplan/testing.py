"""Test doubles shipped with warmplan, for its own tests and its users' - the only
place in the package that holds any.

``RecordingWorker`` implements the Worker protocol and records every call made on
it; ``run_plan_text`` runs plan YAML on one and returns it::

    worker = run_plan_text(yaml_text, max_num_tokens=8)
    assert worker.calls == [Call("slot_mapping", {"num_tokens": 1}), ...]

The recording worker keeps a few named "runner buffers" (plain lists) that its
calls mutate while they run, so that tests can prove ``preserve_state`` restores
them, and ``fail_on`` makes the n-th call of a method raise.

``FakeBackend`` is a deterministic autotune backend that counts who tuned and who
loaded; ``ThreadWorld.group(n)`` is a world whose ranks are threads of one process,
for fast tests of what ranks agree on. This module never imports torch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from warmplan.workers.base import (
    AutotuneBackend,
    AutotuneLoadError,
    Batch,
    Facts,
    Limits,
    Shape,
    WorkerInfo,
)
from warmplan.world import LocalWorld, World, collective_failure, ranks_text


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
        self._limits = Limits(
            max_num_tokens=max_num_tokens,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
        )
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
        self.buffers: dict[str, list[int]] = {
            "positions": [0] * 16,
            "query_start_loc": [0, 0],
            "slot_mapping": [0] * 16,
        }

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
        return WorkerInfo(
            engine="recording",
            device="none",
            versions={"torch": None, "triton": None, "flashinfer": None},
        )

    def config_fingerprint(self) -> Mapping[str, Any]:
        return dict(self._config)

    def slot_mapping(self, num_tokens: int) -> None:
        self._touch("slot_mapping", num_tokens)
        self.calls.append(Call("slot_mapping", {"num_tokens": num_tokens}))
        self._maybe_fail("slot_mapping")

    def dummy_run(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> None:
        self._touch("dummy_run", num_tokens)
        self.calls.append(
            Call(
                "dummy_run",
                {
                    "shape": shape,
                    "num_tokens": num_tokens,
                    "prior_context": prior_context,
                    "force_attention": force_attention,
                },
            )
        )
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


def run_plan_text(
    text: str, worker: RecordingWorker | None = None, **worker_kwargs: Any
) -> RecordingWorker:
    """Run plan YAML ``text`` on a ``RecordingWorker`` (made from ``worker_kwargs``)."""
    from warmplan.executor import run_plan
    from warmplan.plan import parse_plan

    worker = worker or RecordingWorker(**worker_kwargs)
    run_plan(parse_plan(text), worker)
    return worker


class FakeBackend:
    """A deterministic ``AutotuneBackend``: "tuning" records the token counts a worker
    reports through ``observe`` while ``tuning()`` is entered; ``export`` serialises
    them as JSON tactics; ``load`` keeps what it was given."""

    def __init__(
        self,
        *,
        name: str = "fake",
        version: str = "1",
        rank: int = 0,
        unavailable: str | None = None,
        extra_metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.rank = rank
        self._unavailable = unavailable
        self.extra_metadata = dict(extra_metadata or {})
        self.active = False
        self.observed: set[int] = set()
        self.loaded: dict[str, Any] | None = None
        self.tuned_count = 0

    def unavailable_reason(self) -> str | None:
        return self._unavailable

    def metadata(self) -> Mapping[str, str]:
        return {"fake_version": self.version, **self.extra_metadata}

    @contextlib.contextmanager
    def tuning(self) -> Iterator[None]:
        self.tuned_count += 1
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def observe(self, num_tokens: int) -> None:
        """Called by a worker's run: while tuning, remember the bucket."""
        if self.active:
            self.observed.add(num_tokens)

    def export(self) -> bytes:
        if not self.tuned_count:
            return b""
        # Deterministic: the same runs give the same bytes on every rank and launch.
        tactics = {str(n): ("wide" if n >= 64 else "narrow") for n in sorted(self.observed)}
        tactics = tactics or {"*": "narrow"}
        return json.dumps({"backend": self.name, "tactics": tactics}, sort_keys=True).encode()

    def load(self, payload: bytes) -> None:
        try:
            doc = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AutotuneLoadError(f"fake backend cannot parse payload: {exc}") from exc
        if not isinstance(doc, dict) or "tactics" not in doc:
            raise AutotuneLoadError("fake backend payload has no 'tactics'")
        self.loaded = doc


class _Exchange:
    """What the threads of one ``ThreadWorld`` group share: one round per collective."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.cond = threading.Condition()
        self.rounds: dict[int, dict[int, Any]] = {}


class ThreadWorld:
    """One rank of an in-process world whose ranks are threads (fast policy tests).

    ``ThreadWorld.group(n)`` returns ``n`` worlds sharing one exchange; each
    collective waits for every rank's contribution to the same round, or raises
    ``WorldTimeout`` naming the ranks that did not arrive.
    """

    def __init__(self, rank: int, exchange: _Exchange, *, local_rank: int | None = None) -> None:
        self.rank = rank
        self.local_rank = rank if local_rank is None else local_rank
        self.world_size = exchange.world_size
        self._ex = exchange
        self._round = 0

    @classmethod
    def group(cls, n: int, *, local_ranks: list[int] | None = None) -> list[ThreadWorld]:
        ex = _Exchange(n)
        return [
            cls(r, ex, local_rank=None if local_ranks is None else local_ranks[r]) for r in range(n)
        ]

    def _exchange(self, value: Any, what: str, timeout_s: float) -> list[Any]:
        self._round += 1
        rnd, ex = self._round, self._ex
        deadline = time.monotonic() + timeout_s
        with ex.cond:
            ex.rounds.setdefault(rnd, {})[self.rank] = value
            ex.cond.notify_all()
            while len(ex.rounds[rnd]) < ex.world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(ex.world_size)) - set(ex.rounds[rnd]))
                    raise collective_failure(
                        what,
                        rank=self.rank,
                        waiting_for=ranks_text(missing),
                        timeout_s=timeout_s,
                        timed_out=True,
                    )
                ex.cond.wait(left)
            return [ex.rounds[rnd][r] for r in range(ex.world_size)]

    def broadcast_bytes(
        self, data: bytes | None, *, src: int = 0, timeout_s: float
    ) -> bytes | None:
        got: bytes | None = self._exchange(data, f"broadcast from rank {src}", timeout_s)[src]
        return got

    def all_gather_str(self, value: str, *, timeout_s: float) -> list[str]:
        return [str(v) for v in self._exchange(value, "all_gather", timeout_s)]

    def barrier(self, *, timeout_s: float) -> None:
        self._exchange(None, "barrier", timeout_s)
