"""The Worker protocol: everything a warmup step may ask of an inference worker.

Steps speak only this protocol; only modules under ``warmplan/workers/`` know an
engine. The protocol is deliberately small:

* ``limits`` - the token/sequence maximums that requested counts are clamped to;
* ``facts`` - what plan gates read (platform, capability, backends, flags, env);
* ``world`` - rank, local rank, world size and the collectives autotune needs;
* ``slot_mapping`` / ``dummy_run`` - the two warmup actions;
* ``preserve_state`` - snapshot every runner buffer a step touches, restore it on
  exit, also when the step raises;
* ``synchronize`` - wait for queued device work;
* ``autotune_backend`` - the tuning backends this worker can run;
* ``describe`` / ``config_fingerprint`` - for reports and cache keys.

This module never imports torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from warmplan.domains import KeyDomain

if TYPE_CHECKING:
    from warmplan.world import World

Shape = Literal["mixed", "single_prefill", "uniform_decode", "plain"]
SHAPES: tuple[Shape, ...] = ("mixed", "single_prefill", "uniform_decode", "plain")

LIMIT_NAMES: tuple[str, ...] = ("max_num_tokens", "max_num_batched_tokens", "max_num_seqs")


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The worker's maximums; every requested token count is clamped to one of them."""

    max_num_tokens: int
    max_num_batched_tokens: int
    max_num_seqs: int

    def get(self, name: str) -> int:
        """Return the limit called ``name``; a miss lists the names that exist."""
        if name not in LIMIT_NAMES:
            raise KeyError(f"unknown limit {name!r}; expected one of {', '.join(LIMIT_NAMES)}")
        value: int = getattr(self, name)
        return value

    def as_dict(self) -> dict[str, int]:
        return {name: self.get(name) for name in LIMIT_NAMES}


@dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    """What a worker reports about itself, read by plan gates.

    ``device_capability`` is ``(major, minor)`` or ``None`` off CUDA.
    ``flags`` holds named booleans such as vLLM's ``enable_flashinfer_autotune``;
    a flag that is absent is *unset*, which is distinct from ``False``.
    ``env`` is the environment the gates read (normally ``os.environ``).
    """

    platform: str
    device_capability: tuple[int, int] | None = None
    attention_backends: tuple[str, ...] = ()
    pooling: bool = False
    flags: Mapping[str, bool] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "device_capability": (
                None if self.device_capability is None else list(self.device_capability)
            ),
            "attention_backends": list(self.attention_backends),
            "pooling": self.pooling,
            "flags": dict(self.flags),
        }


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """One prefill chunk: ``tokens`` new tokens after ``context`` tokens already cached."""

    tokens: int
    context: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    """A real serving batch: ``decode`` one-token decode requests plus prefill chunks."""

    decode: int = 0
    prefill: tuple[PrefillChunk, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.decode + sum(chunk.tokens for chunk in self.prefill)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInfo:
    """How a worker describes itself in reports."""

    engine: str
    device: str
    versions: Mapping[str, str | None] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)


class AutotuneBackend(Protocol):
    """A tuning backend a worker can run (FlashInfer, Triton autotune, builtin).

    The flow the autotune step drives::

        with backend.tuning():          # the leader (or every rank) tunes
            worker.dummy_run(...)
        payload = backend.export()      # the tuned results, as bytes
        backend.load(payload)           # on every rank: install them
    """

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def unavailable_reason(self) -> str | None:
        """``None`` when the backend can tune and load here, else why not."""

    def metadata(self) -> Mapping[str, str]:
        """What must match between writer and reader for results to be loadable."""

    def tuning(self) -> contextlib.AbstractContextManager[None]:
        """While entered, the worker's runs tune this backend's ops."""

    def export(self) -> bytes:
        """The results tuned so far, serialised; ``b""`` when nothing was tuned."""

    def load(self, payload: bytes) -> None:
        """Install results produced by ``export``; raise ``AutotuneLoadError`` on failure."""


class AutotuneLoadError(RuntimeError):
    """A backend refused a tuning payload (wrong format, mismatched environment)."""


class StepUnsupported(Exception):
    """Raised by a worker, before it changed anything, when a step cannot do on this
    worker what it is for: the kernel it warms does not vary with what the step
    varies, or it would run collectives where the worker must stay process-local.
    The executor records the step as skipped with this message as the reason; it is
    never a silent different run."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineWarmup:
    """One of an engine's own named warmups (a function its hard-coded warmup calls)."""

    name: str
    description: str
    collective: bool = False  # runs collectives: every rank must call it


@runtime_checkable
class Worker(Protocol):
    """What a warmup step may ask of an inference worker, and nothing else."""

    @property
    def limits(self) -> Limits: ...

    @property
    def facts(self) -> Facts: ...

    @property
    def world(self) -> World: ...

    def describe(self) -> WorkerInfo: ...

    def config_fingerprint(self) -> Mapping[str, Any]:
        """What changes tuning results: model and parallel config (JSON-serialisable)."""

    def slot_mapping(self, num_tokens: int) -> None:
        """Compute the slot mapping of one request of ``num_tokens`` tokens."""

    def dummy_run(
        self,
        shape: Shape,
        num_tokens: int,
        *,
        prior_context: int = 0,
        force_attention: bool = False,
    ) -> None:
        """Run a forward pass of ``num_tokens`` tokens shaped as ``shape``."""

    def preserve_state(self) -> contextlib.AbstractContextManager[None]:
        """Snapshot every runner buffer a step touches; restore it on exit, even on error."""

    def synchronize(self) -> None: ...

    def autotune_backend(self, name: str) -> AutotuneBackend | None:
        """The backend called ``name``, or ``None`` when this worker has none."""


@runtime_checkable
class EngineWarmupWorker(Worker, Protocol):
    """A worker whose engine has named warmups of its own (vLLM's ``kernel_warmup()``
    parts), which the ``engine_warmup`` step runs one at a time."""

    def engine_warmups(self) -> Mapping[str, EngineWarmup]:
        """The named warmups this engine offers, in the engine's own order."""

    def run_engine_warmup(self, name: str) -> None:
        """Run the engine's warmup called ``name`` (a key of :meth:`engine_warmups`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JitKernelInfo:
    """A kernel whose compile keys a worker can warm (``compile_keys`` steps).

    ``backend``: what compiles it here (``triton``, ``inductor-aot``, ``vllm:triton``);
    ``domain``: its declared cases (the default a plan narrows or extends);
    ``params``: its parameter names, for error messages."""

    name: str
    backend: str
    description: str = ""
    domain: KeyDomain | None = None
    params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CompileKey:
    """One compiled variant of a kernel, however many cases map to it.

    ``key``: a stable digest of what the compiler keys the variant by (for Triton its
    cache key(s): binder specialisation, options, autotune configs); two cases with
    the same ``key`` compile once. ``case``: the representative case that reproduces
    it; ``label``: a short readable form; ``members``: how many cases mapped here."""

    kernel: str
    key: str
    label: str
    case: Mapping[str, Any] = field(default_factory=dict)
    members: int = 1
    variants: int = 1  # compiler artefacts behind the key (autotune configs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "key": self.key,
            "label": self.label,
            "members": self.members,
            "variants": self.variants,
        }


KeyOutcome = Literal["compiled", "loaded", "present"]


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyResult:
    """What warming one key did: ``compiled`` (the compiler ran), ``loaded`` (from an
    on-disk cache), ``present`` (already in this process); ``seconds`` its wall time."""

    key: CompileKey
    outcome: KeyOutcome
    seconds: float
    rank: int | None = None  # the rank that compiled it, when a warmup was split


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySet:
    """The keys a domain expands to on this worker, and how it got there."""

    kernel: str
    keys: tuple[CompileKey, ...]
    cases: int  # cases expanded (after collapse and filters)
    declared: int  # cases the domain declares
    collapsed: tuple[str, ...] = ()  # parameters whose ranges became class representatives


@runtime_checkable
class KeyedWorker(Worker, Protocol):
    """A worker that can warm kernels by compile key: compile each variant a declared
    domain needs without running the kernel (``compile_keys`` steps)."""

    def jit_kernels(self) -> Mapping[str, JitKernelInfo]:
        """The kernels this worker can warm by key, by name."""

    def compile_keys(
        self, kernel: str, domain: KeyDomain | None, *, mode: str = "replace"
    ) -> KeySet:
        """Expand ``domain`` (``None``: the kernel's own) over the kernel's declared
        domain (``mode``: ``replace`` or ``extend`` per parameter) into deduplicated
        keys. Raises ``DomainError`` for a bad domain, ``StepUnsupported`` when the
        kernel cannot be keyed here."""

    def compile(self, keys: Sequence[CompileKey], *, threads: int = 1) -> list[KeyResult]:
        """Compile (or load) each key without launching the kernel; ``threads`` > 1
        compiles concurrently where the compiler allows. In ``keys``' order."""

    def key_artefacts(self) -> Sequence[str]:
        """Directories whose files are the compiled keys (to share across ranks)."""


@runtime_checkable
class ServingWorker(Worker, Protocol):
    """A worker that can also run real batches through its serving path (trace replay)."""

    def execute(self, batch: Batch) -> None:
        """Run ``batch`` exactly as serving would."""


@contextlib.contextmanager
def no_state() -> Iterator[None]:
    """A ``preserve_state`` for workers whose steps touch no persistent buffers."""
    yield
