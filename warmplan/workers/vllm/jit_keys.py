"""vLLM 0.34's explicit compile keys as warmplan's ``KeyedWorker`` (``compile_keys`` steps).

vLLM 0.34 collects, while its model runner is built, every JIT kernel that declares
its compile keys (``vllm.model_executor.warmup.jit_warmup``): a kernel registers
itself, with the arguments its key expansion needs, on the runner's
``jit_warmup_registry``; ``JitWarmupRegistry.warmup()`` later expands each kernel's
keys (``get_warmup_keys``, once per distinct registration, union of the hashable
keys) and compiles them (``compile_many``; Triton kernels in one shared pool,
``compile_triton_warmup``). This module lets a plan do the same per kernel, with
its own domain, and report every key.

The keys are always vLLM's own: warmplan never derives a key itself. What a plan
changes goes in through the two places vLLM's expansion reads its domains:

* a kernel whose warmup *cases* method is AST-traced (``WarmupIntRange`` /
  ``WarmupChoices`` / ``_when`` in a ``triton_kernel_dispatcher_with_warmup``'s
  ``warmup_inputs``): each local name assigned a domain in that method is a
  parameter; ``_expand_warmup_cases`` is called with a ``_value_expander`` that
  hands back the plan's values for that name (``replace``) or vLLM's followed by
  the plan's (``extend``). vLLM's ``_provider_cases`` does not forward that hook,
  so it is given per call, on the kernel instance, for the duration of the call;
* a kernel whose ``get_warmup_keys`` calls ``self._trace_dispatch(self.dispatch)(
  name=WarmupIntRange(...), ...)``: each keyword of that call is a parameter.

Cases that vLLM's own ``_when`` keeps are then filtered by the plan's ``where``
(over the case's scalar values and the worker's limits; tensors and other
non-scalar inputs are not available to a filter). Every case is keyed by vLLM, one
case at a time, so each key knows how many cases mapped to it; the set of keys is
the same as one ``get_warmup_keys`` call would give (keys are deduplicated by
their own equality, as ``JitWarmupRegistry.warmup`` does).

A kernel whose cases are code vLLM does not trace warms with its own domain only
(``domain=None``); a plan domain for it is ``StepUnsupported``.

Compiling a key is vLLM's ``kernel.compile(key)``; with ``threads`` > 1, kernels
vLLM deems parallel-safe (``supports_parallel_compile``) compile in one shared pool
under ``triton.AsyncCompileMode``, as ``compile_triton_warmup`` does, with the
plan's thread count. A Triton key is ``present`` when Triton's in-process cache
already held each of its variants, ``loaded`` when Triton's compile listener saw
every variant come from the on-disk cache, else ``compiled``.

Every ``import vllm`` and ``import triton`` happens inside functions.

Over ~400 lines on purpose: reading vLLM's registrations as domains, narrowing and
extending them, and compiling their keys are one contract with one vLLM release's
registry; split, each piece would depend on the others' reading of its internals.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import dataclasses
import hashlib
import inspect
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from warmplan.domains import MAX_CASES, DomainError, IntRange, KeyDomain, evaluate, parse_filter
from warmplan.workers.base import (
    CompileKey,
    JitKernelInfo,
    KeyOutcome,
    KeyResult,
    KeySet,
    StepUnsupported,
)
from warmplan.workers.triton_target import CompileListener

DOMAIN_CALLS: Final = frozenset({"WarmupIntRange", "WarmupChoices"})
# vLLM's helper base classes, by what compiles their kernels.
HELPER_BACKENDS: Final = {
    "VllmTritonJitKernel": "triton",
    "VllmCuTeDSLJitKernel": "cutedsl",
    "VllmTileLangJitKernel": "tilelang",
}
# Methods whose presence in a kernel's get_warmup_keys means its cases can be hooked.
_HOOKABLE: Final = ("_provider_cases", "_expand_warmup_cases", "_trace_dispatch")
_LABEL_MAX: Final = 120

Registration = tuple[tuple[Any, ...], dict[str, Any]]


# --------------------------------------------------------------------------- small helpers


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _short(value: Any) -> str:
    """A readable form: ``torch.bfloat16`` -> ``bfloat16``; a stand-in tensor -> its dtype."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not _is_scalar(value):
        return _short(dtype)
    return str(value).removeprefix("torch.")


def _scalars(case: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in case.items() if _is_scalar(v)}


def _label(items: Mapping[str, Any]) -> str:
    text = ", ".join(f"{k}={_short(v)}" for k, v in items.items() if k != "grid")
    return text if len(text) <= _LABEL_MAX else text[: _LABEL_MAX - 3] + "..."


def _vllm_values(value: Any) -> tuple[Any, ...]:
    """vLLM's own expansion of one declared domain (``_expand_warmup_values``)."""
    from vllm.model_executor.warmup.jit_warmup import _expand_warmup_values

    return tuple(_expand_warmup_values(value))


def _last_name(node: ast.AST) -> str:
    from vllm.model_executor.warmup.jit_warmup import get_ast_full_name

    return (get_ast_full_name(node) or "").split(".")[-1]


def traced_domain_names(cases_fn: Any) -> tuple[str, ...] | None:
    """The names a warmup-cases method assigns a ``WarmupIntRange`` / ``WarmupChoices``
    to, in statement order - the order ``_expand_warmup_cases`` expands them in,
    before any domain written inline in the returned case. ``None`` when vLLM does
    not trace the method (no domain or ``_when`` call in it)."""
    from vllm.model_executor.warmup.jit_warmup import get_function_source_node

    try:
        node = get_function_source_node(cases_fn)
    except (OSError, TypeError, ValueError):
        return None
    if not any(
        isinstance(n, ast.Call) and _last_name(n.func) in DOMAIN_CALLS | {"_when"}
        for n in ast.walk(node)
    ):
        return None
    if not isinstance(node, ast.FunctionDef):
        return ()
    names = []
    for statement in node.body:
        target: ast.AST | None = None
        value: ast.AST | None = None
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        if (
            isinstance(target, ast.Name)
            and isinstance(value, ast.Call)
            and _last_name(value.func) in DOMAIN_CALLS
        ):
            names.append(target.id)
    return tuple(names)


def kernel_backend(kernel: Any) -> str:
    """``vllm:triton``, ``vllm:cutedsl``, ``vllm:tilelang``, else ``vllm:<class>``."""
    for cls in type(kernel).__mro__:
        if cls.__name__ in HELPER_BACKENDS:
            return f"vllm:{HELPER_BACKENDS[cls.__name__]}"
    return f"vllm:{type(kernel).__name__}"


def kernel_base_name(kernel: Any) -> str:
    """A decorated Triton dispatcher is named by the function it wraps; a kernel
    class by its class."""
    if type(kernel).__name__ == "_DecoratedTritonJitKernel":
        name = getattr(kernel, "__dict__", {}).get("__name__")
        if isinstance(name, str) and name:
            return name
    return type(kernel).__name__


def _registrations(registry: Any) -> list[tuple[Any, list[Registration]]]:
    """Each kernel and its distinct registrations, with ``vllm_config`` passed where
    ``JitWarmupRegistry.warmup`` passes it (an empty registration of a kernel whose
    ``get_warmup_keys`` takes ``vllm_config``)."""
    out = []
    for kernel, regs in dict(getattr(registry, "_registrations", {}) or {}).items():
        wants_config = "vllm_config" in inspect.signature(kernel.get_warmup_keys).parameters
        fixed: list[Registration] = []
        for args, kwargs in regs:
            if not args and not kwargs and wants_config:
                kwargs = {"vllm_config": registry.vllm_config}
            fixed.append((tuple(args), dict(kwargs)))
        out.append((kernel, fixed))
    return out


def _hookable(kernel: Any) -> bool:
    """Whether the kernel's ``get_warmup_keys`` goes through a method a domain can
    be given to (decorated Triton dispatchers always do)."""
    if hasattr(type(kernel), "_provider_cases"):
        return True
    try:
        source = inspect.getsource(type(kernel).get_warmup_keys)
    except (OSError, TypeError):
        return False
    return any(name in source for name in _HOOKABLE)


def key_digest(vkey: Any) -> str:
    """A stable digest of a vLLM compile key: for a ``TritonCompileKey`` Triton's cache
    keys of its variants (sorted), else the key's type and ``repr``."""
    jit_keys = getattr(vkey, "jit_keys", None)
    if isinstance(jit_keys, frozenset) and jit_keys:
        parts = sorted(repr(getattr(j, "cache_key", j)) for j in jit_keys)
    else:
        parts = [type(vkey).__qualname__, repr(vkey)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _key_fields(vkey: Any) -> dict[str, Any]:
    if getattr(vkey, "jit_keys", None) is not None:
        return dict(getattr(vkey, "inputs", ()) or ())
    if dataclasses.is_dataclass(vkey) and not isinstance(vkey, type):
        return {f.name: getattr(vkey, f.name) for f in dataclasses.fields(vkey)}
    return {}


def _dedupe(values: Iterable[Any]) -> tuple[Any, ...]:
    out: list[Any] = []
    for v in values:
        if not any(v is o or (type(v) is type(o) and v == o) for o in out):
            out.append(v)
    return tuple(out)


# --------------------------------------------------------------------------- plan domains


def _plan_values(domain: KeyDomain) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for name, items in domain.params:
        values: list[Any] = []
        for item in items:
            if isinstance(item, IntRange):
                if len(item) > MAX_CASES:
                    raise DomainError(
                        f"domain.{name}",
                        f"expected at most {MAX_CASES} values, found a range of {len(item)}",
                    )
                values.extend(item)
            else:
                values.append(item)
        out[name] = _dedupe(values)
    return out


def _coerce(name: str, values: tuple[Any, ...], declared: tuple[Any, ...]) -> tuple[Any, ...]:
    """The plan's values in the declared values' terms: a string names a torch dtype
    where the kernel declares dtypes (``bfloat16``, ``torch.float8_e4m3fn``)."""
    import torch

    if not any(isinstance(d, torch.dtype) for d in declared):
        return values
    out = []
    for v in values:
        if isinstance(v, str):
            dtype = getattr(torch, v.removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise DomainError(f"domain.{name}", f"expected a torch dtype name, found {v!r}")
            v = dtype
        out.append(v)
    return tuple(out)


class _Filters:
    """A plan's ``where``, over a case's scalar values and the worker's limits."""

    def __init__(self, where: Sequence[str], env: Mapping[str, Any]) -> None:
        self.env = dict(env)
        self.nodes = []
        for j, text in enumerate(where):
            try:
                self.nodes.append((j, parse_filter(text)))
            except ValueError as exc:
                raise DomainError(f"where.{j}", str(exc)) from None

    def __bool__(self) -> bool:
        return bool(self.nodes)

    def keep(self, case: Mapping[str, Any]) -> bool:
        if not self.nodes:
            return True
        scope = {**self.env, **_scalars(case)}
        for j, node in self.nodes:
            try:
                ok = bool(evaluate(node, scope))
            except KeyError as exc:
                hidden = sorted(k for k, v in case.items() if not _is_scalar(v))
                extra = f" (not scalars, so unavailable: {', '.join(hidden)})" if hidden else ""
                raise DomainError(
                    f"where.{j}",
                    f"unknown name {exc.args[0]!r}; known: {', '.join(sorted(scope))}{extra}",
                ) from None
            except (TypeError, ArithmeticError) as exc:
                raise DomainError(f"where.{j}", f"{exc} (case {_label(case)})") from None
            if not ok:
                return False
        return True


# --------------------------------------------------------------------------- the hooks


class _Hooks:
    """One ``get_warmup_keys`` call with the plan's domain in vLLM's expansion.

    ``describe``: record the declared domains and expand nothing. ``only``: key this
    one case (already expanded) instead of expanding the domain again."""

    def __init__(
        self,
        kernel: Any,
        *,
        values: Mapping[str, tuple[Any, ...]] | None = None,
        mode: str = "replace",
        filters: _Filters | None = None,
        describe: bool = False,
        only: Mapping[str, Any] | None = None,
    ) -> None:
        self.kernel = kernel
        self.values = dict(values or {})
        self.mode = mode
        self.filters = filters
        self.describe = describe
        self.only = only
        self.domains: list[tuple[str, Any]] = []  # named, narrowable domains as declared
        self.unnamed = 0  # domains written inline in a case
        self.expansions = 0
        self.provider_calls = 0
        self.declared = 0
        self.cases: list[Mapping[str, Any]] = []
        self.case_keys: list[tuple[Mapping[str, Any], list[Any]]] = []  # traced dispatch

    # -- narrowing one declared domain

    def _narrowed(self, name: str | None, value: Any) -> tuple[Any, ...]:
        if name is None:
            self.unnamed += 1
        else:
            self.domains.append((name, value))
        if self.describe:
            return ()
        declared = _vllm_values(value)
        if name is None or name not in self.values:
            return declared
        plan = _coerce(name, self.values[name], declared)
        return _dedupe((*declared, *plan)) if self.mode == "extend" else plan

    def _expander(
        self, names: tuple[str, ...]
    ) -> tuple[Callable[[Any], tuple[Any, ...]], list[int]]:
        calls = itertools.count()
        product = [1]

        def expand(value: Any) -> tuple[Any, ...]:
            i = next(calls)
            out = self._narrowed(names[i] if i < len(names) else None, value)
            product[0] *= len(out)
            if product[0] > MAX_CASES:
                raise DomainError(
                    "domain", f"expected at most {MAX_CASES} cases, the product is {product[0]}"
                )
            return out

        return expand, product

    # -- the methods put on the kernel instance

    def _expand_warmup_cases(self, cases_fn: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        if self.only is not None:
            return iter([self.only])
        self.expansions += 1
        expand, product = self._expander(traced_domain_names(cases_fn) or ())
        cls = type(self.kernel)
        cases = cls._expand_warmup_cases(
            self.kernel, cases_fn, *args, _value_expander=expand, **kwargs
        )
        if self.describe:
            return iter(list(cases))
        counted = self._counting(cases, product)
        return counted if self.provider_calls else self._kept(counted)

    def _counting(self, cases: Iterator[Any], product: list[int]) -> Iterator[Any]:
        yield from cases  # vLLM expands every domain before its first case
        self.declared += product[0]

    def _provider_cases(self, provider: Any, *args: Any, **kwargs: Any) -> Iterable[Any]:
        if self.only is not None:
            return [self.only]
        self.provider_calls += 1
        before = self.expansions
        cases = type(self.kernel)._provider_cases(self.kernel, provider, *args, **kwargs)
        if self.describe:
            list(cases)
            return []
        if self.expansions == before:  # a plain cases function: its cases are declared
            cases = list(cases)
            self.declared += len(cases)
        return self._kept(iter(cases))

    def _kept(self, cases: Iterator[Any]) -> Iterator[Any]:
        for case in cases:
            if self.filters is None or self.filters.keep(case):
                self.cases.append(case)
                yield case

    def _trace_dispatch(self, dispatch: Any) -> Callable[..., list[Any]]:
        traced = type(self.kernel)._trace_dispatch(self.kernel, dispatch)

        def per_case(*groups: Any, _when: Any = None, **kwargs: Any) -> list[Any]:
            from vllm.model_executor.warmup.jit_warmup import WarmupChoices, zip_inputs

            self.expansions += 1
            axes = [(name, self._narrowed(name, value)) for name, value in kwargs.items()]
            if self.describe:
                return []
            rows = [tuple(g.rows) for g in groups]
            total = 1
            for values in [*rows, *(v for _, v in axes)]:
                total *= len(values)
            if total > MAX_CASES:
                raise DomainError("domain", f"expected at most {MAX_CASES} cases, found {total}")
            self.declared += total
            names = [name for name, _ in axes]
            keys: dict[Any, None] = {}
            for combo in itertools.product(*rows, *(v for _, v in axes)):
                chosen, picked = combo[: len(rows)], combo[len(rows) :]
                case: dict[str, Any] = {}
                for row in chosen:
                    case.update(row)
                case.update(zip(names, picked, strict=True))
                if self.filters is not None and not self.filters.keep(case):
                    continue
                self.cases.append(case)
                # One value per keyword: vLLM's own expansion, dispatch and _when.
                found = traced(
                    *(zip_inputs(row) for row in chosen),
                    _when=_when,
                    **{n: WarmupChoices(v) for n, v in zip(names, picked, strict=True)},
                )
                self.case_keys.append((case, list(found)))
                for k in found:
                    keys[k] = None
            return list(keys)

        return per_case

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The hooks on the kernel instance (shadowing its class's methods) for the
        duration of one call; what the instance had before is put back."""
        names = [n for n in _HOOKABLE if hasattr(type(self.kernel), n)]
        previous = {n: self.kernel.__dict__[n] for n in names if n in vars(self.kernel)}
        with _HOOK_LOCK:
            for n in names:
                setattr(self.kernel, n, getattr(self, n))
            try:
                yield
            finally:
                for n in names:
                    if n in previous:
                        setattr(self.kernel, n, previous[n])
                    else:
                        with contextlib.suppress(AttributeError):
                            delattr(self.kernel, n)


_HOOK_LOCK = threading.RLock()


# --------------------------------------------------------------------------- kernels


@dataclasses.dataclass
class _Kernel:
    name: str
    kernel: Any
    registrations: list[Registration]
    info: JitKernelInfo
    narrowable: bool  # vLLM expands its cases through a hook warmplan can give a domain


def _declared_domain(domains: Sequence[tuple[str, Any]]) -> KeyDomain | None:
    """vLLM's declared domains as data (a plain ``WarmupIntRange`` as a range)."""
    from vllm.model_executor.warmup.jit_warmup import WarmupIntRange

    merged: dict[str, list[Any]] = {}
    for name, value in domains:
        items = merged.setdefault(name, [])
        if isinstance(value, WarmupIntRange) and value.advance is None and value.stop > value.start:
            last = value.start + (value.stop - 1 - value.start) // value.step * value.step
            rng = IntRange(value.start, last, value.step)
            if rng not in items:
                items.append(rng)
            continue
        for v in _vllm_values(value):
            item = v if _is_scalar(v) else _short(v)
            if item not in items:
                items.append(item)
    if not merged:
        return None
    return KeyDomain(params=tuple((n, tuple(items)) for n, items in merged.items()))


def _describe(name: str, kernel: Any, regs: list[Registration]) -> _Kernel:
    domains: list[tuple[str, Any]] = []
    traced = False
    if _hookable(kernel):
        for args, kwargs in regs:
            hooks = _Hooks(kernel, describe=True)
            with contextlib.suppress(Exception), hooks.installed():
                kernel.get_warmup_keys(*args, **kwargs)
            traced = traced or hooks.expansions > 0
            domains.extend(hooks.domains)
    own = vars(kernel) if hasattr(kernel, "__dict__") else {}
    # A decorated dispatcher carries its function's module and docstring.
    doc = inspect.cleandoc(own.get("__doc__") or inspect.getdoc(type(kernel)) or "")
    module = own.get("__module__") or type(kernel).__module__
    what = f"{module}.{kernel_base_name(kernel)}"
    description = f"{what}: {doc.splitlines()[0]}" if doc else what
    domain = _declared_domain(domains)
    params = tuple(dict.fromkeys(n for n, _ in domains))
    info = JitKernelInfo(
        name=name,
        backend=kernel_backend(kernel),
        description=f"{description} ({len(regs)} registration{'s' * (len(regs) != 1)})",
        domain=domain,
        params=params,
    )
    return _Kernel(name, kernel, regs, info, narrowable=traced)


# --------------------------------------------------------------------------- compiling


def _jit_functions(kernel: Any) -> dict[int, Any]:
    """The ``JITFunction`` objects behind a Triton kernel (through autotuners and
    heuristics), by ``id`` - what a ``TritonJitKey`` names."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    out: dict[int, Any] = {}
    obj = getattr(kernel, "kernel", None)
    for _ in range(16):
        if obj is None:
            break
        if isinstance(obj, JITFunction):
            out[id(obj)] = obj
        obj = getattr(obj, "fn", None)
    return out


def _triton_entries(kernel: Any, vkey: Any) -> list[Any] | None:
    """Triton's in-process cache entries of each variant of a ``TritonCompileKey``
    (``None`` for a variant not there); ``None`` for any other key."""
    jit_keys = getattr(vkey, "jit_keys", None)
    if not isinstance(jit_keys, frozenset):
        return None
    fns = _jit_functions(kernel)
    out = []
    for jk in jit_keys:
        fn = fns.get(jk.jit_function_id)
        entry = None
        if fn is not None:
            with contextlib.suppress(KeyError, IndexError, TypeError):
                entry = fn.device_caches[jk.device][0].get(jk.cache_key)
        out.append(entry)
    return out


def _present(kernel: Any, vkey: Any) -> bool:
    entries = _triton_entries(kernel, vkey)
    if entries is not None:
        return bool(entries) and all(e is not None for e in entries)
    cache = getattr(kernel, "_compiled_cache", None)
    try:
        return isinstance(cache, Mapping) and vkey in cache
    except TypeError:
        return False


def _outcome(
    kernel: Any, vkey: Any, listener: CompileListener, events: list[bool] | None
) -> KeyOutcome:
    """``loaded`` when every variant came from Triton's disk cache, else ``compiled``.
    ``events``: the listener's events during this key's compile (serial compiles)."""
    entries = _triton_entries(kernel, vkey)
    if entries is not None:
        hits = []
        for entry in entries:
            if entry is not None and hasattr(entry, "result"):
                entry = entry.result()
            h = getattr(entry, "hash", None)
            hits.append(listener.hits.get(str(h)) if h is not None else None)
        return "loaded" if hits and all(hits) else "compiled"
    if events is not None:
        if events and all(events):
            return "loaded"
        if not events and kernel_backend(kernel) == "vllm:triton":
            return "present"  # Triton's in-process cache had every launch it made
    return "compiled"


def triton_cache_dirs() -> list[str]:
    """Triton's on-disk kernel cache (``TRITON_CACHE_DIR`` or its default), if Triton
    is importable."""
    try:
        from triton import knobs

        directory = knobs.cache.dir
    except Exception:  # no Triton, or one without knobs
        return []
    return [str(directory)] if directory else []


# --------------------------------------------------------------------------- the keys


class VllmJitKeys:
    """The kernels of a runner's ``jit_warmup_registry`` as compile keys.

    ``registry``: returns the runner's registry (``None`` when it has none)."""

    def __init__(self, registry: Callable[[], Any]) -> None:
        self._registry = registry
        self._described: dict[tuple[int, int], _Kernel] = {}
        self._real: dict[tuple[str, str], tuple[Any, Any]] = {}  # (kernel, key) -> vLLM's

    def kernels(self) -> dict[str, _Kernel]:
        registry = self._registry()
        if registry is None:
            return {}
        out: dict[str, _Kernel] = {}
        seen: dict[str, int] = {}
        for kernel, regs in _registrations(registry):
            base = kernel_base_name(kernel)
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}-{seen[base]}"
            cached = self._described.get((id(kernel), len(regs)))
            if cached is None or cached.name != name or cached.kernel is not kernel:
                cached = self._described[(id(kernel), len(regs))] = _describe(name, kernel, regs)
            out[name] = cached
        return out

    def jit_kernels(self) -> dict[str, JitKernelInfo]:
        return {name: k.info for name, k in self.kernels().items()}

    def compile_keys(
        self,
        name: str,
        domain: KeyDomain | None,
        *,
        mode: str = "replace",
        env: Mapping[str, Any] | None = None,
    ) -> KeySet:
        kernels = self.kernels()
        entry = kernels.get(name)
        if entry is None:
            raise StepUnsupported(
                f"vLLM's jit_warmup_registry has no kernel {name!r}; it has: "
                f"{', '.join(kernels) or 'none'}"
            )
        if mode not in ("replace", "extend"):
            raise DomainError("mode", f"expected replace or extend, found {mode!r}")
        planned = domain is not None and bool(domain.params or domain.rows or domain.where)
        if planned and not entry.narrowable:
            raise StepUnsupported(
                f"kernel {name} ({type(entry.kernel).__name__}) declares its cases in code "
                "vLLM does not trace (no WarmupIntRange/WarmupChoices/_when reached through "
                "_expand_warmup_cases or _trace_dispatch); it warms with its own domain only "
                "(leave out domain, rows and where)"
            )
        values: dict[str, tuple[Any, ...]] = {}
        filters: _Filters | None = None
        if domain is not None:
            if domain.rows:
                raise DomainError(
                    "rows",
                    f"kernel {name}: vLLM expands a kernel's declared domains as a product; "
                    "rows in lockstep cannot be given to it (use domain and where)",
                )
            known = entry.info.params
            for param, _ in domain.params:
                if param not in known:
                    raise DomainError(
                        f"domain.{param}",
                        f"kernel {name} has no domain {param!r}; its domains: "
                        f"{', '.join(known) or 'none'}",
                    )
            values = _plan_values(domain)
            filters = _Filters(domain.where, env or {})
        keys: dict[Any, list[Mapping[str, Any]]] = {}
        cases = declared = 0
        for args, kwargs in entry.registrations:
            try:
                found, n_cases, n_declared = self._expand(
                    entry.kernel, args, kwargs, values, mode, filters
                )
            except (DomainError, StepUnsupported):
                raise
            except Exception as exc:
                if not planned:
                    raise
                raise DomainError(
                    "domain",
                    f"vLLM could not key kernel {name} with the plan's domain: "
                    f"{type(exc).__name__}: {exc}",
                ) from exc
            for vkey, members in found.items():
                keys.setdefault(vkey, []).extend(members)
            cases += n_cases
            declared += n_declared
        out = []
        for vkey, members in keys.items():
            digest = key_digest(vkey)
            self._real[(name, digest)] = (entry.kernel, vkey)
            representative = members[0] if members else _key_fields(vkey)
            jit_keys = getattr(vkey, "jit_keys", None)
            out.append(
                CompileKey(
                    kernel=name,
                    key=digest,
                    label=_label(representative) or digest,
                    case=_scalars(representative),
                    members=max(1, len(members)),
                    variants=len(jit_keys) if isinstance(jit_keys, frozenset) else 1,
                )
            )
        return KeySet(kernel=name, keys=tuple(out), cases=cases, declared=declared)

    def _expand(
        self,
        kernel: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        values: Mapping[str, tuple[Any, ...]],
        mode: str,
        filters: _Filters | None,
    ) -> tuple[dict[Any, list[Mapping[str, Any]]], int, int]:
        """One registration's keys (vLLM's order) with the cases that map to each,
        the cases kept and the cases declared."""
        hooks = _Hooks(kernel, values=values, mode=mode, filters=filters)
        with hooks.installed():
            result = list(kernel.get_warmup_keys(*args, **kwargs))
        found: dict[Any, list[Mapping[str, Any]]] = {k: [] for k in result}
        if hooks.case_keys:  # a traced dispatch: each case was keyed on its own
            for case, ks in hooks.case_keys:
                for k in ks:
                    if k in found:
                        found[k].append(case)
            return found, len(hooks.cases), hooks.declared
        once = hooks.provider_calls == 1 or (not hooks.provider_calls and hooks.expansions == 1)
        if once and hooks.cases:
            # The cases method, once: key each kept case on its own (vLLM's whole
            # derivation, one case at a time) to know which cases share a key.
            for case in hooks.cases:
                one = _Hooks(kernel, only=case)
                with one.installed():
                    for k in kernel.get_warmup_keys(*args, **kwargs):
                        if k in found:
                            found[k].append(case)
            return found, len(hooks.cases), hooks.declared
        if hooks.expansions or hooks.provider_calls:
            return found, len(hooks.cases), hooks.declared
        return found, len(result), len(result)

    # -- compiling

    def compile(self, keys: Sequence[CompileKey], *, threads: int = 1) -> list[KeyResult]:
        entries = []
        for key in keys:
            real = self._real.get((key.kernel, key.key))
            if real is None:
                raise KeyError(
                    f"kernel {key.kernel}: no key {key.key} (keys come from compile_keys)"
                )
            entries.append((key, *real))
        results: dict[int, KeyResult] = {}
        todo: list[int] = []
        for i, (key, kernel, vkey) in enumerate(entries):
            if _present(kernel, vkey):
                results[i] = KeyResult(key=key, outcome="present", seconds=0.0)
            else:
                todo.append(i)
        listener = CompileListener()
        parallel = [i for i in todo if threads > 1 and self._parallel(entries[i][1])]
        if len(parallel) < 2:
            parallel = []
        serial = [i for i in todo if i not in set(parallel)]
        with listener.installed():
            if parallel:
                self._compile_parallel(entries, parallel, threads, listener, results)
            for i in serial:
                key, kernel, vkey = entries[i]
                before = len(listener.events)
                t0 = time.perf_counter()
                kernel.compile(vkey)
                seconds = time.perf_counter() - t0
                outcome = _outcome(kernel, vkey, listener, listener.events[before:])
                results[i] = KeyResult(key=key, outcome=outcome, seconds=seconds)
        return [results[i] for i in range(len(entries))]

    @staticmethod
    def _parallel(kernel: Any) -> bool:
        """vLLM's own judgement: CUDA, not autotuned, Triton with ``AsyncCompileMode``."""
        try:
            return bool(getattr(kernel, "supports_parallel_compile", False))
        except Exception:
            return False

    @staticmethod
    def _compile_parallel(
        entries: Sequence[tuple[CompileKey, Any, Any]],
        indices: Sequence[int],
        threads: int,
        listener: CompileListener,
        results: dict[int, KeyResult],
    ) -> None:
        """vLLM's shared pool (``compile_triton_warmup``) with the plan's thread count:
        every key is submitted from this thread, Triton compiles them concurrently, and
        each kernel's own ``compile_many`` sees the shared pool and does not nest one."""
        import triton
        from vllm.model_executor.warmup import jit_warmup_triton_helper as helper

        starts: dict[int, float] = {}

        def run() -> None:
            shared = getattr(helper, "_shared_compile_pool", None)
            if shared is not None:
                shared.set(True)
            with (
                ThreadPoolExecutor(max_workers=min(threads, len(indices))) as pool,
                triton.AsyncCompileMode(pool),
            ):
                for i in indices:
                    _, kernel, vkey = entries[i]
                    starts[i] = time.perf_counter()
                    kernel.compile(vkey)

        contextvars.copy_context().run(run)
        end = time.perf_counter()
        for i in indices:
            key, kernel, vkey = entries[i]
            outcome = _outcome(kernel, vkey, listener, None)
            results[i] = KeyResult(key=key, outcome=outcome, seconds=end - starts[i])
