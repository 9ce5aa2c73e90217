"""A tiny deterministic tuning backend and worker, for tests and for trying plans.

``FakeBackend`` "tunes" by recording the token counts the worker runs while its
``tuning()`` is entered; ``export`` serialises them as JSON. Each entry into
``tuning()`` appends a line to ``<record_dir>/tuned.rank<R>`` and each ``load`` to
``loaded.rank<R>``, so multi-process tests can count exactly who tuned.
``die_in_tuning`` makes the process exit abruptly inside ``tuning()`` (a leader killed
mid-tune). ``from_env`` reads ``WARMPLAN_FAKE_RECORD_DIR``, ``WARMPLAN_FAKE_DIE_IN_TUNING``,
``WARMPLAN_FAKE_VERSION`` and ``WARMPLAN_FAKE_UNAVAILABLE``.

This module never imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from warmplan.dist import LocalWorld, World
from warmplan.workers.base import (
    AutotuneBackend,
    AutotuneLoadError,
    Facts,
    Limits,
    Shape,
    WorkerInfo,
    no_state,
)


class FakeBackend:
    """A deterministic ``AutotuneBackend`` that records who tuned and who loaded."""

    def __init__(
        self,
        *,
        name: str = "fake",
        version: str = "1",
        rank: int = 0,
        record_dir: str | None = None,
        die_in_tuning: bool = False,
        unavailable: str | None = None,
        tune_seconds: float = 0.0,
        extra_metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._name = name
        self._version = version
        self.rank = rank
        self.record_dir = record_dir
        self.die_in_tuning = die_in_tuning
        self._unavailable = unavailable
        self.tune_seconds = tune_seconds
        self.extra_metadata = dict(extra_metadata or {})
        self.active = False
        self.observed: set[int] = set()
        self.loaded: dict[str, Any] | None = None
        self.tuned_count = 0

    @classmethod
    def from_env(cls, *, rank: int = 0, env: Mapping[str, str] | None = None) -> FakeBackend:
        e = os.environ if env is None else env
        return cls(
            version=e.get("WARMPLAN_FAKE_VERSION", "1"),
            rank=rank,
            record_dir=e.get("WARMPLAN_FAKE_RECORD_DIR") or None,
            die_in_tuning=e.get("WARMPLAN_FAKE_DIE_IN_TUNING") == "1",
            unavailable=e.get("WARMPLAN_FAKE_UNAVAILABLE") or None,
            tune_seconds=float(e.get("WARMPLAN_FAKE_TUNE_SECONDS", "0")),
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    def unavailable_reason(self) -> str | None:
        return self._unavailable

    def metadata(self) -> Mapping[str, str]:
        return {"fake_version": self._version, **self.extra_metadata}

    def _record(self, what: str, line: str) -> None:
        if self.record_dir is None:
            return
        os.makedirs(self.record_dir, exist_ok=True)
        with open(os.path.join(self.record_dir, f"{what}.rank{self.rank}"), "a") as f:
            f.write(line + "\n")

    @contextlib.contextmanager
    def tuning(self) -> Iterator[None]:
        self.tuned_count += 1
        self._record("tuned", f"pid={os.getpid()}")
        if self.die_in_tuning:
            os._exit(17)
        self.active = True
        try:
            yield
            if self.tune_seconds:
                time.sleep(self.tune_seconds)
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
        return json.dumps({"backend": self._name, "tactics": tactics}, sort_keys=True).encode()

    def load(self, payload: bytes) -> None:
        try:
            doc = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AutotuneLoadError(f"fake backend cannot parse payload: {exc}") from exc
        if not isinstance(doc, dict) or "tactics" not in doc:
            raise AutotuneLoadError("fake backend payload has no 'tactics'")
        self.loaded = doc
        self._record("loaded", json.dumps(doc, sort_keys=True))


class FakeWorker:
    """A minimal CPU ``Worker`` whose runs feed a ``FakeBackend``; records its calls."""

    def __init__(
        self,
        *,
        world: World | None = None,
        backend: AutotuneBackend | None = None,
        limits: Limits | None = None,
        run_seconds: float = 0.0,
    ) -> None:
        self._world = world if world is not None else LocalWorld()
        self.backend = backend
        self._limits = limits or Limits(
            max_num_tokens=256, max_num_batched_tokens=512, max_num_seqs=16
        )
        self.run_seconds = run_seconds
        self.calls: list[tuple[str, Shape, int]] = []

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def facts(self) -> Facts:
        return Facts(platform="cpu")

    @property
    def world(self) -> World:
        return self._world

    def describe(self) -> WorkerInfo:
        return WorkerInfo(engine="fake", device="cpu", versions={})

    def config_fingerprint(self) -> Mapping[str, Any]:
        return {"model": "fake"}

    def slot_mapping(self, num_tokens: int) -> None:
        self.calls.append(("slot_mapping", "plain", num_tokens))

    def dummy_run(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> None:
        self.calls.append(("dummy_run", shape, num_tokens))
        if self.run_seconds:
            time.sleep(self.run_seconds)
        observe = getattr(self.backend, "observe", None)
        if callable(observe):
            observe(num_tokens)

    def preserve_state(self) -> contextlib.AbstractContextManager[None]:
        return no_state()

    def synchronize(self) -> None:
        return None

    def autotune_backend(self, name: str) -> AutotuneBackend | None:
        if self.backend is not None and self.backend.name == name:
            return self.backend
        return None


class _Exchange:
    def __init__(self, world_size: int) -> None:
        import threading

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
        self._rank = rank
        self._local_rank = rank if local_rank is None else local_rank
        self._ex = exchange
        self._round = 0

    @classmethod
    def group(cls, n: int, *, local_ranks: list[int] | None = None) -> list[ThreadWorld]:
        ex = _Exchange(n)
        return [
            cls(r, ex, local_rank=None if local_ranks is None else local_ranks[r]) for r in range(n)
        ]

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def world_size(self) -> int:
        return self._ex.world_size

    def _exchange(self, value: Any, what: str, timeout_s: float) -> list[Any]:
        from warmplan.dist import WorldTimeout

        self._round += 1
        rnd, ex = self._round, self._ex
        deadline = time.monotonic() + timeout_s
        with ex.cond:
            ex.rounds.setdefault(rnd, {})[self._rank] = value
            ex.cond.notify_all()
            while len(ex.rounds[rnd]) < ex.world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(ex.world_size)) - set(ex.rounds[rnd]))
                    raise WorldTimeout(
                        f"{what} timed out after {timeout_s:g}s on rank {self._rank} "
                        f"waiting for rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
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
