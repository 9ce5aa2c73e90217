"""The built-in engine's kernels as compile keys (``compile_keys`` steps).

Three kernels, each with a declared default domain:

* ``slot_mapping`` (``num_tokens``: 1 .. max_num_tokens) - on CUDA the Triton
  kernel, keyed by Triton's own binder and cache key across its autotune configs
  (so a key is the set of variants one ``num_tokens`` class compiles: the 21-size
  fan is 3 keys of 4 configs each); on CPU the compiled torch function, keyed by the
  variant the engine's dispatch picks (``== 1``, ``% 16 == 0``, other), which is
  the ahead-of-time artefact's name.
* ``chunk_metadata`` (``has_prior_context``: false, true) - Triton's
  ``HAS_PRIOR_CONTEXT`` constexpr, or the CPU function's static bool.
* ``forward`` (``num_tokens``: the compile sizes; ``impl``: ``auto``, the
  attention implementation the engine's tuner picks for that size, or one of
  ``sdpa``/``matmul``) - the model's graph per padded size, an inductor artefact.

``KeyModel`` derives keys from the engine config alone, so ``warmplan plan`` can
count them before any engine exists; for Triton on a machine without a GPU it binds
for a target (``warmplan.workers.triton_target``). ``KeyCompiler`` compiles keys
on a running engine without launching: Triton's ``warmup`` on storage-less
stand-in tensors (concurrently under ``triton.AsyncCompileMode`` where Triton has
it), then a load onto the device; the CPU and forward artefacts through
``AotFunction.prepare`` (traced on the engine's buffers, never called); forward
graphs from one queue in this process and spawned ones (``threads``). Without
ahead-of-time artefacts (``WARMPLAN_AOT=0``) a CPU key is warmed by one call of
its kernel, and the report says ``launched``.

Over ~400 lines on purpose: the keys a kernel has and how each is compiled must
agree (the key model's variants are what the compiler compiles), so both stay here.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from warmplan.domains import DomainError, IntRange, KeyDomain, expand
from warmplan.log import get_logger
from warmplan.workers.base import (
    CompileKey,
    JitKernelInfo,
    KeyOutcome,
    KeyResult,
    KeySet,
    Limits,
)
from warmplan.workers.builtin import kernels as K
from warmplan.workers.builtin.attention import ATTENTION_IMPLS
from warmplan.workers.builtin.config import EngineConfig
from warmplan.workers.triton_target import CompileListener, TargetDriver

if TYPE_CHECKING:
    from warmplan.workers.builtin.runner import ModelRunner

KERNELS = ("slot_mapping", "chunk_metadata", "forward")
# Forward graphs compile here and in up to this many spawned processes (threads - 1);
# each builds the engine once (seconds) and joins the queue of keys when it is built.
POOL_MAX = 8
POOL_TIMEOUT_S = 1800.0
_log = get_logger("warmplan.keys")


@dataclass(frozen=True, slots=True)
class StandIn:
    """A compile-only tensor: what Triton's binder reads (dtype, 16-byte alignment of
    the pointer) and no storage."""

    dtype: torch.dtype
    aligned: bool = True

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:20]


def _label(case: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.items())


# --------------------------------------------------------------------------- Triton


@dataclass(frozen=True, slots=True)
class TritonVariant:
    """One ``JITFunction.warmup`` call: the function, its arguments, Triton's cache key."""

    fn: Any
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    cache_key: str


def _bind(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """Triton's own cache key of a launch: its binder's specialisation and options,
    through ``compute_cache_key``, as ``JITFunction.run`` computes it."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import compute_cache_key

    device = driver.active.get_current_device()
    _, key_cache, _, _, binder = fn.device_caches[device]
    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    _, specialization, options = binder(*args, **kw)
    return str(compute_cache_key(key_cache, specialization, options))


def triton_variants(
    kernel: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> list[TritonVariant]:
    """The variants one launch may compile: one per autotune config (``triton.autotune``
    benchmarks every config of a new tuning key), one for a plain ``@triton.jit``."""
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner):
        out = []
        for config in kernel.configs:
            kw = {**kwargs, **config.all_kwargs()}
            out.append(
                TritonVariant(kernel.fn, tuple(args), tuple(kw.items()), _bind(kernel.fn, args, kw))
            )
        return out
    return [TritonVariant(kernel, tuple(args), tuple(kwargs.items()), _bind(kernel, args, kwargs))]


def _target() -> str:
    from triton.runtime import driver

    target = driver.active.get_current_target()
    return f"{target.backend}:{target.arch}:{target.warp_size}"


# --------------------------------------------------------------------------- the model


class KeyModel:
    """Which compile key each case of a kernel's domain is, from the engine config.

    ``triton``: key the metadata kernels as Triton does (the engine runs them on
    CUDA); off, as the CPU torch functions are keyed. ``choose_impl``: the engine's
    attention choice per padded size (``impl: auto``); absent, the default."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        triton: bool,
        choose_impl: Callable[[int], str] | None = None,
    ) -> None:
        self.config = config
        self.triton = triton
        self.choose_impl = choose_impl or (lambda padded: ATTENTION_IMPLS[0])
        self.sizes = config.effective_compile_sizes
        self.variants: dict[str, list[TritonVariant]] = {}  # key -> Triton variants

    def kernels(self) -> dict[str, JitKernelInfo]:
        cfg = self.config
        meta = "triton" if self.triton else "inductor-aot"
        return {
            "slot_mapping": JitKernelInfo(
                name="slot_mapping",
                backend=meta,
                description="slot = block_table[req, pos // block_size] * block_size + pos % block_size",
                domain=KeyDomain(params=(("num_tokens", (IntRange(1, cfg.max_num_tokens),)),)),
                params=("num_tokens",),
            ),
            "chunk_metadata": JitKernelInfo(
                name="chunk_metadata",
                backend=meta,
                description="per-token metadata of prefill chunks; a second chunk has prior context",
                domain=KeyDomain(params=(("has_prior_context", (False, True)),)),
                params=("has_prior_context",),
            ),
            "forward": JitKernelInfo(
                name="forward",
                backend="inductor-aot",
                description="the model's graph at each compile size",
                domain=KeyDomain(params=(("num_tokens", self.sizes), ("impl", ("auto",)))),
                params=("num_tokens", "impl"),
            ),
        }

    def padded(self, n: int) -> int:
        for size in self.sizes:
            if size >= n:
                return size
        return n

    def env(self, limits: Limits) -> dict[str, Any]:
        cfg = self.config
        return {
            **limits.as_dict(),
            "block_size": cfg.block_size,
            "max_model_len": cfg.max_model_len,
            "compile_sizes": self.sizes,
        }

    def keyset(
        self, name: str, domain: KeyDomain | None, mode: str, limits: Limits
    ) -> tuple[KeySet, dict[str, dict[str, Any]]]:
        """The kernel's keys for ``domain`` over its declared one, and each key's case."""
        info = self.kernels().get(name)
        if info is None or info.domain is None:
            raise KeyError(name)
        merged = info.domain.merged(domain, mode=mode) if domain else info.domain
        unknown = [p for p in merged.names if p not in info.params]
        if unknown:
            raise DomainError(
                f"domain.{unknown[0]}",
                f"kernel {name} has no parameter {unknown[0]!r}; its parameters: "
                + ", ".join(info.params),
            )
        # Only Triton's plain ints collapse to their classes; the CPU variants of
        # slot_mapping follow the same three classes (kernels.size_class).
        collapsible = (lambda p: p == "num_tokens") if name == "slot_mapping" else (lambda p: False)
        expansion = expand(merged, env=self.env(limits), collapsible=collapsible)
        keys: dict[str, CompileKey] = {}
        cases: dict[str, dict[str, Any]] = {}
        members: dict[str, int] = {}
        for case in expansion.cases:
            self._check_case(name, case, limits)
            key, label, nvar = self.key_of(name, case)
            members[key] = members.get(key, 0) + 1
            if key not in keys:
                keys[key] = CompileKey(kernel=name, key=key, label=label, case=case, variants=nvar)
                cases[key] = case
        out = tuple(
            CompileKey(
                kernel=k.kernel,
                key=k.key,
                label=k.label,
                case=k.case,
                members=members[k.key],
                variants=k.variants,
            )
            for k in keys.values()
        )
        return (
            KeySet(
                kernel=name,
                keys=out,
                cases=len(expansion.cases),
                declared=expansion.declared,
                collapsed=expansion.collapsed,
            ),
            cases,
        )

    def _check_case(self, name: str, case: Mapping[str, Any], limits: Limits) -> None:
        n = case.get("num_tokens")
        if "num_tokens" in case and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise DomainError("domain.num_tokens", f"expected token counts >= 1, found {n!r}")
        if isinstance(n, int) and n > limits.max_num_tokens:
            raise DomainError(
                "domain.num_tokens",
                f"expected at most max_num_tokens ({limits.max_num_tokens}), found {n} "
                "(add where: [num_tokens <= max_num_tokens] to drop larger values)",
            )
        if name == "chunk_metadata" and not isinstance(case.get("has_prior_context"), bool):
            raise DomainError(
                "domain.has_prior_context",
                f"expected true or false, found {case.get('has_prior_context')!r}",
            )
        impl = case.get("impl")
        if name == "forward" and impl not in ("auto", *ATTENTION_IMPLS):
            raise DomainError(
                "domain.impl", f"expected auto, {', '.join(ATTENTION_IMPLS)}; found {impl!r}"
            )

    def key_of(self, name: str, case: Mapping[str, Any]) -> tuple[str, str, int]:
        """(key, label, variants) of one case."""
        if name == "forward":
            padded = self.padded(case["num_tokens"])
            impl = case["impl"] if case["impl"] != "auto" else self.choose_impl(padded)
            graph = f"n{padded}" if padded in self.sizes else "dynamic"
            return f"forward-{graph}-{impl}", f"padded={padded}, impl={impl}", 1
        if self.triton:
            variants = self._triton_variants(name, case)
            # Triton's in-process key omits the target (its caches are per device);
            # ours may cross machines, so the target is part of it.
            key = _digest([f"{_target()}|{v.cache_key}" for v in variants])
            self.variants[key] = variants
            return key, self._triton_label(name, case), len(variants)
        if name == "slot_mapping":
            cls = K.size_class(case["num_tokens"])
            return f"slot_mapping-{cls}", f"num_tokens {cls} (e.g. {case['num_tokens']})", 1
        prior = int(bool(case["has_prior_context"]))
        return f"chunk_metadata-prior{prior}", f"has_prior_context={bool(prior)}", 1

    def _triton_label(self, name: str, case: Mapping[str, Any]) -> str:
        if name == "slot_mapping":
            n = case["num_tokens"]
            return f"num_tokens {K.size_class(n)} (e.g. {n})"
        return f"HAS_PRIOR_CONTEXT={bool(case['has_prior_context'])}"

    def _triton_variants(self, name: str, case: Mapping[str, Any]) -> list[TritonVariant]:
        if K.triton_module() is None:
            raise RuntimeError("triton is not installed")
        i64 = StandIn(torch.int64)
        cfg = self.config
        if name == "slot_mapping":
            n = case["num_tokens"]
            # As Kernels.slot_mapping launches it: whole aligned buffers, the block
            # table's row stride, the autotuner's size bucket (not specialised).
            args: tuple[Any, ...] = (
                i64,
                i64,
                i64,
                i64,
                n,
                cfg.max_blocks_per_seq,
                K.next_power_of_two(n),
            )
            return triton_variants(K._slot_mapping_kernel, args, {"block_size": cfg.block_size})
        args = (i64,) * 7 + (0,)
        kwargs = {"HAS_PRIOR_CONTEXT": bool(case["has_prior_context"]), "BLOCK": 128}
        return triton_variants(K._chunk_metadata_kernel, args, kwargs)


# --------------------------------------------------------------------------- compiling


class KeyCompiler:
    """Compiles keys on a running engine (see the module's docstring)."""

    def __init__(self, runner: ModelRunner, model: KeyModel) -> None:
        self.runner = runner
        self.model = model
        self.launched: set[str] = set()  # keys warmed by a call, not ahead of time

    def compile(
        self, keys: Sequence[CompileKey], cases: Mapping[str, Mapping[str, Any]], threads: int
    ) -> list[KeyResult]:
        results: dict[int, KeyResult] = {}
        triton_keys = [
            (i, k) for i, k in enumerate(keys) if k.kernel != "forward" and self.model.triton
        ]
        if triton_keys:
            for i, r in self._compile_triton([k for _, k in triton_keys], threads):
                results[triton_keys[i][0]] = r
        by_pool, here = self._compile_in_pool(
            [k for i, k in enumerate(keys) if i not in results], cases, threads
        )
        for i, key in enumerate(keys):
            if i in results:
                continue
            if key.key in here:  # compiled in this process while the pool ran
                outcome, seconds = here[key.key]
                results[i] = KeyResult(key=key, outcome=outcome, seconds=seconds)
                continue
            t0 = time.perf_counter()
            outcome = self._compile_torch(key, cases[key.key])
            seconds = time.perf_counter() - t0
            if key.key in by_pool:  # a pool process compiled it; this process loaded it
                outcome, seconds = "compiled", by_pool[key.key] + seconds
            results[i] = KeyResult(key=key, outcome=outcome, seconds=seconds)
        return [results[i] for i in range(len(keys))]

    # -- torch graphs in parallel processes

    def _pool_candidates(self, keys: Sequence[CompileKey]) -> list[CompileKey]:
        """Forward keys with no artefact on disk and none in this process: the ones
        worth a compile process (dynamo and inductor's lowering hold the GIL, so
        threads would not overlap them)."""
        if not any(k.kernel == "forward" for k in keys):
            return []  # nothing for a process (and a Triton-only compiler has no engine)
        r = self.runner
        fn = r._static_aot
        if r.aot is None or fn is None:
            return []
        out = []
        for k in keys:
            if k.kernel != "forward" or not k.key.startswith("forward-n"):
                continue
            name = k.key.removeprefix("forward-")
            if name in fn._compiled or os.path.exists(r.aot.path(f"forward-{name}")):
                continue
            out.append(k)
        return out

    def _compile_in_pool(
        self, keys: Sequence[CompileKey], cases: Mapping[str, Mapping[str, Any]], threads: int
    ) -> tuple[dict[str, float], dict[str, tuple[KeyOutcome, float]]]:
        """Compile the forward keys that need it in ``threads`` compilers: this process
        and ``threads - 1`` spawned ones, each building the same engine and saving
        into the same AOT store (atomic writes). The keys are one queue (a shared
        counter): this process starts on it at once, each spawned one when its engine
        is built (seconds of imports), so no compiler waits on a fixed share while
        another idles. Returns (key -> seconds for what a spawned process compiled,
        which this process then loads; key -> (outcome, seconds) for what this
        process compiled). A key a failed process claimed is left to the caller,
        which compiles what is not on disk."""
        todo = self._pool_candidates(keys)
        workers = min(threads - 1, len(todo) - 1, POOL_MAX)
        if workers < 1 or os.environ.get("WARMPLAN_KEY_POOL", "1") == "0":
            return {}, {}
        r = self.runner
        assert r.aot is not None
        root = os.path.dirname(os.path.dirname(r.aot.directory))
        queue = [(k.key, dict(cases[k.key])) for k in todo]
        config = r.config.as_dict()
        inductor_threads = _inductor_share(workers + 1)
        spawned: dict[str, float] = {}
        here: dict[str, tuple[KeyOutcome, float]] = {}
        ctx = multiprocessing.get_context("spawn")
        counter = ctx.Value("i", 0)
        try:
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=ctx,
                initializer=_pool_init,
                initargs=(counter,),
            )
            futures = [
                pool.submit(_pool_main, config, root, queue, inductor_threads)
                for _ in range(workers)
            ]
        except Exception as exc:  # no processes at all (a sandbox, a fork bomb guard)
            _log.warning("keys.pool_unavailable", error=f"{type(exc).__name__}: {exc}")
            return {}, {}
        with pool:
            try:
                here = _drain(self, counter, queue)
            finally:
                with counter.get_lock():  # on an error here, nothing more is started
                    counter.value = len(queue)
            for f in futures:
                try:
                    spawned.update(f.result(timeout=POOL_TIMEOUT_S))
                except Exception as exc:  # its claimed keys fall back to this process
                    _log.warning("keys.pool_failed", error=f"{type(exc).__name__}: {exc}")
        return spawned, here

    # -- Triton

    def _compile_triton(
        self, keys: Sequence[CompileKey], threads: int
    ) -> list[tuple[int, KeyResult]]:
        from triton.runtime import driver

        listener = CompileListener()
        device = driver.active.get_current_device()
        todo: list[tuple[int, TritonVariant]] = []
        present = set()
        for i, key in enumerate(keys):
            variants = self.model.variants[key.key]
            cached = [v.cache_key in v.fn.device_caches[device][0] for v in variants]
            if all(cached):
                present.add(i)
            # Only what is not in the process yet (an autotuned launch may have
            # compiled some of a key's configs already) is compiled or loaded here.
            todo.extend((i, v) for v, c in zip(variants, cached, strict=True) if not c)
        starts: dict[int, float] = {}
        ends: dict[int, float] = {}
        t_all = time.perf_counter()
        with listener.installed():
            async_mode = getattr(K.triton_module(), "AsyncCompileMode", None)
            if threads > 1 and async_mode is not None and len(todo) > 1:
                with ThreadPoolExecutor(max_workers=threads) as pool, async_mode(pool):
                    for i, v in todo:
                        starts.setdefault(i, time.perf_counter())
                        v.fn.warmup(*v.args, grid=(1,), **dict(v.kwargs))
                for i, _ in todo:
                    ends[i] = time.perf_counter()
            else:
                for i, v in todo:
                    starts.setdefault(i, time.perf_counter())
                    v.fn.warmup(*v.args, grid=(1,), **dict(v.kwargs))
                    ends[i] = time.perf_counter()
        wall = time.perf_counter() - t_all
        # A stand-in driver (a target, no device) compiles; nothing can be loaded then.
        load_onto_device = torch.cuda.is_available() and not isinstance(driver.active, TargetDriver)
        out = []
        for i, key in enumerate(keys):
            if i in present:
                out.append((i, KeyResult(key=key, outcome="present", seconds=0.0)))
                continue
            outcomes = []
            for j, v in todo:
                if j != i:
                    continue
                compiled = v.fn.device_caches[device][0].get(v.cache_key)
                if compiled is not None and hasattr(compiled, "result"):
                    compiled = compiled.result()
                h = getattr(compiled, "hash", None)
                outcomes.append(listener.hits.get(str(h)) if h is not None else None)
                if load_onto_device and compiled is not None and hasattr(compiled, "_init_handles"):
                    compiled._init_handles()  # onto the device now, not at the first launch
            outcome: KeyOutcome = "loaded" if outcomes and all(outcomes) else "compiled"
            seconds = ends.get(i, t_all + wall) - starts.get(i, t_all)
            out.append((i, KeyResult(key=key, outcome=outcome, seconds=seconds)))
        return out

    # -- torch (CPU metadata kernels, the forward)

    def _compile_torch(self, key: CompileKey, case: Mapping[str, Any]) -> KeyOutcome:
        r = self.runner
        b, cfg = r.buffers, r.config
        if key.kernel == "forward":
            padded = self.model.padded(case["num_tokens"])
            impl = key.key.rsplit("-", 1)[1]
            if r._static_aot is not None and padded in r.compile_sizes:
                kv_len = max(padded, r.min_kv)
                args = (
                    r.model,
                    b["input_ids"][:padded],
                    b["positions"][:padded],
                    b["slot_mapping"][:padded],
                    b["kv_slots"][:kv_len],
                    b["kv_lo"][:padded],
                    b["kv_hi"][:padded],
                    impl,
                )
                with torch.no_grad():
                    return _outcome(r._static_aot.prepare(*args)[1])
            self.launched.add(key.key)
            with r.preserve_state(), torch.no_grad():
                r.dummy_run("plain", min(case["num_tokens"], cfg.max_num_batched_tokens))
            return "compiled"
        kern = r.kernels
        if key.kernel == "slot_mapping":
            n = case["num_tokens"]
            fn = kern._slot.get(K.size_class(n))
            prepare = getattr(fn, "prepare", None)
            if prepare is not None:
                with torch.no_grad():
                    return _outcome(
                        prepare(
                            b["block_tables"], b["req_idx"][:n], b["positions"][:n], cfg.block_size
                        )[1]
                    )
            self.launched.add(key.key)
            with r.preserve_state(), torch.no_grad():
                r.slot_mapping(n)
            return "compiled"
        prior = bool(case["has_prior_context"])
        prepare = getattr(kern._meta, "prepare", None)
        if prepare is not None:
            tokens = torch.arange(b["positions"].numel(), dtype=torch.int64, device=r.device)
            offset = torch.tensor(0, dtype=torch.int64, device=r.device)
            with torch.no_grad():
                return _outcome(
                    prepare(
                        b["query_start_loc"],
                        b["context_lens"],
                        b["kv_start"],
                        tokens,
                        offset,
                        prior,
                    )[1]
                )
        self.launched.add(key.key)
        with r.preserve_state(), torch.no_grad():
            r.dummy_run("single_prefill", 16, 16 if prior else 0)
        return "compiled"


_shared_counter: Any = None  # a spawned compile process's handle on the key queue


def _pool_init(counter: Any) -> None:
    global _shared_counter
    _shared_counter = counter


def _claim(counter: Any, n: int) -> int | None:
    """The next unclaimed index of a queue of ``n`` keys, or ``None``."""
    with counter.get_lock():
        i = int(counter.value)
        if i >= n:
            return None
        counter.value = i + 1
        return i


def _drain(
    compiler: KeyCompiler, counter: Any, queue: Sequence[tuple[str, dict[str, Any]]]
) -> dict[str, tuple[KeyOutcome, float]]:
    """Compile forward keys claimed from the shared queue until it is empty: key ->
    (outcome, seconds). This process and each spawned one run it."""
    out: dict[str, tuple[KeyOutcome, float]] = {}
    while (i := _claim(counter, len(queue))) is not None:
        key, case = queue[i]
        t0 = time.perf_counter()
        ck = CompileKey(kernel="forward", key=key, label=key, case=case)
        outcome = compiler._compile_torch(ck, case)
        out[key] = (outcome, time.perf_counter() - t0)
    return out


def _inductor_share(compilers: int) -> int:
    """Inductor's compile workers for one spawned compiler: the host's cores shared
    among the ``compilers`` processes compiling at once. Left alone, inductor gives
    every process a pool of min(32, cores) worker processes, each importing torch, so
    by inductor's defaults eight compilers on 16 cores would start 136 processes
    (inductor itself skips its pool in fbcode for this reason; what that costs here
    is not measured on a GPU). At 1 a process compiles its kernels in itself, with no
    pool. ``WARMPLAN_POOL_INDUCTOR_THREADS`` overrides the share; a value that is not
    a whole number >= 1 is ignored with a warning."""
    share = max(1, (os.cpu_count() or 1) // max(1, compilers))
    override = os.environ.get("WARMPLAN_POOL_INDUCTOR_THREADS", "")
    if not override:
        return share
    if override.isdigit() and int(override) >= 1:
        return int(override)
    _log.warning(
        "keys.pool_inductor_threads_ignored",
        variable="WARMPLAN_POOL_INDUCTOR_THREADS",
        value=override,
        expected="a whole number >= 1",
        using=share,
    )
    return share


def _pool_main(
    config: dict[str, Any],
    root: str,
    queue: list[tuple[str, dict[str, Any]]],
    inductor_threads: int,
) -> dict[str, float]:
    """A compile process: the same engine on the same AOT root; claims keys from the
    shared queue until it is empty, compiling and saving each key's forward artefact
    (never called), with ``inductor_threads`` compile workers of inductor's. Returns
    key -> seconds."""
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch._inductor.config as inductor_config

    from warmplan.workers.builtin.runner import ModelRunner

    if _shared_counter.value >= len(queue):
        return {}  # drained while this process started: build no engine
    inductor_config.compile_threads = inductor_threads
    cfg = EngineConfig.from_mapping(config)
    runner = ModelRunner(cfg, compile=True, aot_root=root)
    compiler = KeyCompiler(runner, KeyModel(cfg, triton=False))
    return {key: seconds for key, (_, seconds) in _drain(compiler, _shared_counter, queue).items()}


def _outcome(text: str) -> KeyOutcome:
    return "loaded" if text == "loaded" else "present" if text == "present" else "compiled"
