"""Compile-key domains: what a plan declares about a kernel's arguments, and how it
expands into cases (one concrete set of arguments each).

A domain gives each parameter a list of values and integer ranges
(``num_tokens: [{range: [1, 16]}, 32, 64]``), optional ``rows`` that add
parameters in lockstep (``[{a: 1, b: 2}, {a: 4, b: 8}]``: two cases, not four) and
``where`` filters, small Python expressions over the parameters and the worker's
limits (``num_tokens <= max_num_tokens``). The cases are the product of the
parameters, times the rows, less what a filter rejects - the same model as vLLM
0.34's ``WarmupIntRange`` / ``WarmupChoices`` / ``zip_inputs`` / ``_when``, as
data.

An integer range over a parameter Triton specialises (a plain int: one variant for
``== 1``, one for ``% 16 == 0``, one for the rest, per integer type) need not be
enumerated: ``collapse`` gives a caller the range's representatives of each class
(``int_class_representatives``), unless a filter names the parameter, in which
case every member is tried. What the cases compile to - and so which of them are
the same compile key - is the worker's to say (``warmplan.workers.base``).

This module never imports torch. Just over ~400 lines: the grammar, its checks
and its expansion are one data model, read together.
"""

from __future__ import annotations

import ast
import itertools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

Scalar = int | float | str | bool | None

# A domain that expands past this is a typo; it would be built case by case.
MAX_CASES: Final = 1_000_000
# Triton's integer argument types, by range: i32, i64, u64 (its binder's rule).
_INT_TYPE_BOUNDS: Final = (
    (-(1 << 63), -(1 << 31) - 1),
    (-(1 << 31), (1 << 31) - 1),
    (1 << 31, (1 << 63) - 1),
    (1 << 63, (1 << 64) - 1),
)


class DomainError(ValueError):
    """A domain that cannot expand: ``path`` is the field (``where.0``, ``domain.n``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class IntRange:
    """``{range: [lo, hi], step: k}``: ``lo, lo + k, ...`` up to ``hi`` inclusive."""

    lo: int
    hi: int
    step: int = 1

    def __len__(self) -> int:
        return 0 if self.hi < self.lo else (self.hi - self.lo) // self.step + 1

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.lo, self.hi + 1, self.step))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"range": [self.lo, self.hi]}
        if self.step != 1:
            out["step"] = self.step
        return out


DomainItem = Scalar | IntRange


@dataclass(frozen=True, slots=True)
class KeyDomain:
    """A kernel's declared cases. ``params``: name -> values and ranges, in order;
    ``rows``: mappings expanded in lockstep with each other (every row has the same
    names); ``where``: filter expressions, all of which a case must pass."""

    params: tuple[tuple[str, tuple[DomainItem, ...]], ...] = ()
    rows: tuple[tuple[tuple[str, Scalar], ...], ...] = ()
    where: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        row_names = tuple(name for name, _ in self.rows[0]) if self.rows else ()
        return tuple(name for name, _ in self.params) + row_names

    def merged(self, override: KeyDomain, *, mode: str = "replace") -> KeyDomain:
        """``override`` on top of this domain: per parameter its values replace these
        (``mode: replace``) or are added after them (``extend``); its rows, when it has
        any, replace these; its filters are added."""
        mine = dict(self.params)
        for name, items in override.params:
            mine[name] = (*mine.get(name, ()), *items) if mode == "extend" else items
        return KeyDomain(
            params=tuple(mine.items()),
            rows=override.rows or self.rows,
            where=self.where + override.where,
        )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "domain": {
                name: [i.as_dict() if isinstance(i, IntRange) else i for i in items]
                for name, items in self.params
            }
        }
        if self.rows:
            out["rows"] = [dict(row) for row in self.rows]
        if self.where:
            out["where"] = list(self.where)
        return out


def domain_from_raw(raw: Mapping[str, Any]) -> KeyDomain:
    """A domain from a step's validated ``domain`` / ``rows`` / ``where`` fields."""
    params = []
    for name, value in (raw.get("domain") or {}).items():
        items = value if isinstance(value, list) else [value]
        params.append((str(name), tuple(_item(i) for i in items)))
    rows = tuple(tuple((str(k), v) for k, v in row.items()) for row in raw.get("rows") or ())
    return KeyDomain(params=tuple(params), rows=rows, where=tuple(raw.get("where") or ()))


def _item(raw: Any) -> DomainItem:
    if isinstance(raw, dict):
        lo, hi = raw["range"]
        return IntRange(int(lo), int(hi), int(raw.get("step", 1)))
    return raw  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- Triton's classes


def int_class(value: int) -> str:
    """Triton's specialisation of a plain int: ``one``, ``div16`` or ``other``, with its type."""
    kind = "one" if value == 1 else "div16" if value % 16 == 0 else "other"
    return f"{_int_type(value)}:{kind}"


def _int_type(value: int) -> str:
    if -(1 << 31) <= value < (1 << 31):
        return "i32"
    if -(1 << 63) <= value < (1 << 63):
        return "i64"
    return "u64"


def int_class_representatives(r: IntRange) -> tuple[int, ...]:
    """One member of ``r`` per Triton class it holds (``== 1``, ``% 16 == 0``, other,
    per integer type), the smallest of each, in ascending order.

    ``value % 16`` along ``lo, lo + step, ...`` repeats within 16 steps, so scanning
    the first 32 members of each integer-type segment of the range meets every
    class that segment holds."""
    found: dict[str, int] = {}
    for seg_lo, seg_hi in _INT_TYPE_BOUNDS:
        lo, hi = max(r.lo, seg_lo), min(r.hi, seg_hi)
        if lo > hi:
            continue
        first = r.lo + -(-(lo - r.lo) // r.step) * r.step  # first member >= lo
        for k in range(32):
            v = first + k * r.step
            if v > hi:
                break
            found.setdefault(int_class(v), v)
        if lo <= 1 <= hi and (1 - r.lo) % r.step == 0:
            found[int_class(1)] = 1
    return tuple(sorted(set(found.values())))


# --------------------------------------------------------------------------- filters

_BIN: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
}
_CMP: Final[dict[type[ast.cmpop], Callable[[Any, Any], bool]]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
FUNCTIONS: Final[dict[str, Callable[..., Any]]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "cdiv": lambda a, b: -(-a // b),
    "is_power_of_two": lambda n: isinstance(n, int) and n > 0 and not n & (n - 1),
}
CONSTANTS: Final[dict[str, Any]] = {"true": True, "false": False, "null": None}


def parse_filter(text: str) -> ast.expr:
    """Parse a ``where`` expression; ``ValueError`` says what is not allowed.

    Allowed: names, constants, arithmetic (``+ - * // % ** & |``), comparisons
    (chained, ``in``), ``and`` / ``or`` / ``not``, ``x if c else y``, tuples and
    lists, and calls of ``min``, ``max``, ``abs``, ``cdiv``, ``is_power_of_two``."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an expression: {exc.msg}") from None
    for node in ast.walk(tree):
        ok = isinstance(
            node,
            (
                ast.Expression,
                ast.Name,
                ast.Load,
                ast.Constant,
                ast.Compare,
                ast.BoolOp,
                ast.And,
                ast.Or,
                ast.UnaryOp,
                ast.Not,
                ast.USub,
                ast.BinOp,
                ast.IfExp,
                ast.Tuple,
                ast.List,
                ast.Call,
                *_BIN,
                *_CMP,
            ),
        )
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS and not node.keywords
        if not ok:
            raise ValueError(f"{type(node).__name__} is not allowed in a filter")
    return tree.body


def filter_names(text: str) -> set[str]:
    """The names a filter reads, functions and constants left out."""
    return {
        n.id
        for n in ast.walk(parse_filter(text))
        if isinstance(n, ast.Name) and n.id not in FUNCTIONS and n.id not in CONSTANTS
    }


def evaluate(node: ast.AST, names: Mapping[str, Any]) -> Any:
    """Evaluate a parsed filter over ``names``; ``KeyError`` names an unknown name."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id in FUNCTIONS:
            return FUNCTIONS[node.id]
        raise KeyError(node.id)
    if isinstance(node, ast.BoolOp):
        result: Any = isinstance(node.op, ast.And)
        for value in node.values:
            result = evaluate(value, names)
            if bool(result) != isinstance(node.op, ast.And):
                return result
        return result
    if isinstance(node, ast.UnaryOp):
        operand = evaluate(node.operand, names)
        return (not operand) if isinstance(node.op, ast.Not) else -operand
    if isinstance(node, ast.BinOp):
        return _BIN[type(node.op)](evaluate(node.left, names), evaluate(node.right, names))
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, names)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = evaluate(comp, names)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return evaluate(node.body if evaluate(node.test, names) else node.orelse, names)
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(evaluate(e, names) for e in node.elts)
    if isinstance(node, ast.Call):
        fn = FUNCTIONS[node.func.id]  # type: ignore[attr-defined]  # checked by parse_filter
        return fn(*(evaluate(a, names) for a in node.args))
    raise ValueError(f"{type(node).__name__} is not allowed in a filter")


# --------------------------------------------------------------------------- expansion


@dataclass(frozen=True, slots=True)
class Expansion:
    """A domain's cases, and what it took: ``declared`` counts the product before
    ranges collapsed and filters ran; ``collapsed`` names the parameters whose ranges
    were replaced by their Triton class representatives."""

    cases: tuple[dict[str, Any], ...]
    declared: int
    collapsed: tuple[str, ...] = ()
    filtered: int = 0
    env_names: tuple[str, ...] = field(default=())


def declared_count(domain: KeyDomain) -> int:
    """The number of cases the domain declares (ranges counted in full, no filters)."""
    n = max(1, len(domain.rows))
    for _, items in domain.params:
        n *= sum(len(i) if isinstance(i, IntRange) else 1 for i in items)
    return n


def expand(
    domain: KeyDomain,
    *,
    env: Mapping[str, Any] | None = None,
    collapsible: Callable[[str], bool] = lambda name: False,
) -> Expansion:
    """Every case of ``domain``: the product of its parameters (duplicates within a
    parameter dropped) times its rows, kept where every filter is true over the case
    and ``env`` (the worker's limits and facts; a case's own names win).

    A range over a parameter ``collapsible`` accepts, that no filter reads, becomes
    its Triton class representatives. Raises ``DomainError`` on a bad filter or a
    domain past ``MAX_CASES``."""
    env = dict(env or {})
    filters = []
    read: set[str] = set()
    for j, text in enumerate(domain.where):
        try:
            filters.append((j, parse_filter(text)))
            read |= filter_names(text)
        except ValueError as exc:
            raise DomainError(f"where.{j}", str(exc)) from None
    collapsed = []
    axes: list[tuple[str, list[Any]]] = []
    for name, items in domain.params:
        values: list[Any] = []
        collapse = collapsible(name) and name not in read
        for item in items:
            if isinstance(item, IntRange):
                if len(item) > MAX_CASES and not collapse:
                    raise DomainError(
                        f"domain.{name}",
                        f"expected at most {MAX_CASES} values, found a range of {len(item)}",
                    )
                values.extend(int_class_representatives(item) if collapse else item)
            else:
                values.append(item)
        if collapse and any(isinstance(i, IntRange) for i in items):
            collapsed.append(name)
        seen: dict[Any, None] = {}
        for v in values:
            seen.setdefault((type(v), v), None)
        axes.append((name, [v for _, v in seen]))
    total = max(1, len(domain.rows))
    for _, values in axes:
        total *= len(values)
    if total > MAX_CASES:
        raise DomainError("domain", f"expected at most {MAX_CASES} cases, the product is {total}")
    rows: Sequence[tuple[tuple[str, Any], ...]] = domain.rows or ((),)
    cases = []
    dropped = 0
    names = [name for name, _ in axes]
    for combo in itertools.product(*(values for _, values in axes)):
        for row in rows:
            case = dict(zip(names, combo, strict=True))
            case.update(row)
            scope = {**env, **case}
            keep = True
            for j, node in filters:
                try:
                    keep = bool(evaluate(node, scope))
                except KeyError as exc:
                    known = ", ".join(sorted(scope))
                    raise DomainError(
                        f"where.{j}", f"unknown name {exc.args[0]!r}; known: {known}"
                    ) from None
                except (TypeError, ZeroDivisionError, ArithmeticError) as exc:
                    raise DomainError(f"where.{j}", f"{exc} (case {case})") from None
                if not keep:
                    break
            if keep:
                cases.append(case)
            else:
                dropped += 1
    return Expansion(
        cases=tuple(cases),
        declared=declared_count(domain),
        collapsed=tuple(collapsed),
        filtered=dropped,
        env_names=tuple(sorted(env)),
    )
