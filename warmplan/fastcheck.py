"""A fast yes/no check of data against the plan schema.

jsonschema is the reference: it produces the error messages and decides validity.
Walking a 200-step plan through it takes ~50 ms, so validation first runs this
checker - the schema compiled once into nested closures - and calls jsonschema
only when the fast check says no (then jsonschema's verdict stands). A
differential test keeps the two in agreement on generated plans.

Supports exactly the keywords ``warmplan/schema.py`` uses; compiling a schema with
any other keyword raises, so the two cannot silently drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], bool]

_ANNOTATIONS = {"description", "title", "$schema", "$id", "$defs", "default"}
_TYPES: dict[str, Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _equal(a: Any, b: Any) -> bool:
    # JSON equality: true is not 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def num(v: Any) -> bool:
    """A JSON number (not a boolean)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _conjunction(checks: list[Check]) -> Check:
    """All of ``checks``, without a generator per call (this is the hot path)."""
    if not checks:
        return lambda v: True
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        a, b = checks
        return lambda v: a(v) and b(v)
    if len(checks) == 3:
        a, b, c = checks
        return lambda v: a(v) and b(v) and c(v)

    def every(v: Any) -> bool:
        for check in checks:  # noqa: SIM110 - a generator per call is what this avoids
            if not check(v):
                return False
        return True

    return every


def _deref(root: Mapping[str, Any], s: Any) -> Any:
    while isinstance(s, dict) and "$ref" in s and len(s) == 1:
        node: Any = root
        for part in s["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        s = node
    return s


def _discriminator(root: Mapping[str, Any], branches: list[Any]) -> tuple[str, list[str]] | None:
    """``(property, [const of each branch])`` when every branch is an object that
    requires ``property`` with a distinct string const; else ``None``."""
    first = _deref(root, branches[0]) if branches else None
    if not isinstance(first, dict):
        return None
    for prop in first.get("required", []):
        values: list[str] = []
        for b in branches:
            d = _deref(root, b)
            const = (
                d.get("properties", {}).get(prop, {}).get("const") if isinstance(d, dict) else None
            )
            if (
                d.get("type") != "object"
                or prop not in d.get("required", [])
                or not isinstance(const, str)
            ):
                break
            values.append(const)
        else:
            if len(set(values)) == len(values):
                return prop, values
    return None


def compile_schema(root: Mapping[str, Any]) -> Check:
    """Compile ``root`` into a function ``data -> bool``."""
    refs: dict[str, Check] = {}

    def ref(pointer: str) -> Check:
        if pointer not in refs:
            node: Any = root
            for part in pointer.removeprefix("#/").split("/"):
                node = node[part]
            refs[pointer] = lambda v: True  # placeholder for recursion
            refs[pointer] = build(node)
        target = pointer
        return lambda v: refs[target](v)

    def build(s: Any) -> Check:
        if s is True:
            return lambda v: True
        if s is False:
            return lambda v: False
        checks: list[Check] = []
        unknown = (
            set(s)
            - _ANNOTATIONS
            - {
                "type",
                "properties",
                "additionalProperties",
                "required",
                "enum",
                "const",
                "minimum",
                "exclusiveMinimum",
                "maximum",
                "minItems",
                "maxItems",
                "items",
                "prefixItems",
                "oneOf",
                "$ref",
                "pattern",
                "uniqueItems",
                "propertyNames",
                "minLength",
            }
        )
        if unknown:
            raise ValueError(f"fastcheck does not support {sorted(unknown)}")
        if "$ref" in s:
            checks.append(ref(s["$ref"]))
        if "type" in s:
            checks.append(_TYPES[s["type"]])
        if "const" in s:
            const = s["const"]
            checks.append(lambda v: _equal(v, const))
        if "enum" in s:
            options = list(s["enum"])
            if all(isinstance(o, str) for o in options):
                strings = frozenset(options)
                checks.append(lambda v: isinstance(v, str) and v in strings)
            else:
                checks.append(lambda v: any(_equal(v, o) for o in options))
        if "minimum" in s:
            lo = s["minimum"]
            checks.append(lambda v: not num(v) or v >= lo)
        if "exclusiveMinimum" in s:
            xlo = s["exclusiveMinimum"]
            checks.append(lambda v: not num(v) or v > xlo)
        if "maximum" in s:
            hi = s["maximum"]
            checks.append(lambda v: not num(v) or v <= hi)
        if "minLength" in s:
            n = s["minLength"]
            checks.append(lambda v: not isinstance(v, str) or len(v) >= n)
        if "pattern" in s:
            rx = re.compile(s["pattern"])
            checks.append(lambda v: not isinstance(v, str) or rx.search(v) is not None)
        if "minItems" in s:
            mn = s["minItems"]
            checks.append(lambda v: not isinstance(v, list) or len(v) >= mn)
        if "maxItems" in s:
            mx = s["maxItems"]
            checks.append(lambda v: not isinstance(v, list) or len(v) <= mx)
        if s.get("uniqueItems"):
            checks.append(
                lambda v: (
                    not isinstance(v, list)
                    or all(not _equal(a, b) for i, a in enumerate(v) for b in v[i + 1 :])
                )
            )
        prefix = [build(p) for p in s.get("prefixItems", [])]
        if prefix or "items" in s:
            rest = build(s["items"]) if "items" in s else (lambda v: True)
            np_ = len(prefix)

            def items(v: Any) -> bool:
                if not isinstance(v, list):
                    return True
                return all(prefix[i](item) if i < np_ else rest(item) for i, item in enumerate(v))

            checks.append(items)
        if "required" in s:
            req = list(s["required"])
            checks.append(lambda v: not isinstance(v, dict) or all(k in v for k in req))
        if "properties" in s or "additionalProperties" in s or "propertyNames" in s:
            props = {k: build(p) for k, p in s.get("properties", {}).items()}
            if s.get("additionalProperties") is False and "propertyNames" not in s:
                # The common, strict case: every key must be a known property.
                def strict(v: Any) -> bool:
                    if not isinstance(v, dict):
                        return True
                    for k, item in v.items():
                        check = props.get(k)
                        if check is None or not check(item):
                            return False
                    return True

                checks.append(strict)
            else:
                extra = (
                    build(s["additionalProperties"])
                    if "additionalProperties" in s
                    else (lambda v: True)
                )
                names = build(s["propertyNames"]) if "propertyNames" in s else (lambda v: True)

                def obj(v: Any) -> bool:
                    if not isinstance(v, dict):
                        return True
                    for k, item in v.items():
                        check = props.get(k)
                        if check is None:
                            if not extra(item):
                                return False
                        elif not check(item):
                            return False
                        if not names(k):
                            return False
                    return True

                checks.append(obj)
        if "oneOf" in s:
            branches = [build(b) for b in s["oneOf"]]
            tags = _discriminator(root, s["oneOf"])
            if tags is not None:
                # Branches keyed by a required property's const (a step's kind): at most
                # one can match, so dispatch on the value instead of trying them all.
                prop, by_value = tags
                table = dict(zip(by_value, branches, strict=True))

                def one_of(v: Any) -> bool:
                    if not isinstance(v, dict):
                        return False
                    tag = v.get(prop)
                    branch = table.get(tag) if isinstance(tag, str) else None
                    return branch is not None and branch(v)

                checks.append(one_of)
            else:
                checks.append(lambda v: sum(1 for b in branches if b(v)) == 1)
        return _conjunction(checks)

    return build(root)
