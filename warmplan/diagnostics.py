"""Diagnostics: one engine for every user input's problems (plans, ``--model-config``
files, and anything else read from YAML against a JSON Schema).

Each problem is ``file:line:column: path: message``. A ``Report`` collects the
problems of one file, finding each position by walking the YAML node tree along the
path (``steps[2].tokens[0]``); ``add_schema_error`` words a jsonschema error from
the schema itself (its types, enums, bounds, patterns and alternatives), never from
where in the plan the value sits. Problems come back sorted by position, each once.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from warmplan.errors import PlanError
from warmplan.yamlsrc import Located, Mark, YamlError, load_located

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError

Path = tuple[str | int, ...]

# What a pattern means, in words (the schema's patterns, keyed by the pattern itself).
PATTERN_WORDS: dict[str, str] = {
    "^[a-z0-9][a-z0-9_.-]*$": "an id of lower-case letters, digits, '-', '_' or '.'",
    "^[0-9]{1,4}\\.[0-9]{1,4}$": "major.minor such as '9.0'",
}

_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_PLAIN_KEY = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$-]*$")


def format_path(path: Iterable[str | int]) -> str:
    """``("steps", 2, "tokens", 0)`` -> ``steps[2].tokens[0]``; a key that is not a
    plain name (a space, a dot, an empty string) is quoted: ``steps[0].' '``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = part if _PLAIN_KEY.match(part) else repr(part)
        out += f".{name}" if out else name
    return out or "(top level)"


def show(value: Any) -> str:
    """A found value, in words."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    if len(text) > 80:  # a runaway value: its ends and its length say enough
        text = f"{text[:40]}...{text[-20:]} ({len(str(value))} characters)"
    return text


def yaml_error(file: str, exc: YamlError) -> PlanError:
    """A YAML reading problem as a one-line ``PlanError``."""
    where = f"{exc.mark.line}:{exc.mark.column}:" if exc.mark else ""
    return PlanError([f"{file}:{where} {exc.message}"])


def read_yaml(text: str, *, file: str) -> Located:
    """``load_located``, with its problems worded as every other input's."""
    try:
        return load_located(text)
    except YamlError as exc:
        raise yaml_error(file, exc) from None


class Report:
    """The problems of one file; ``add(path, message)`` finds the position."""

    def __init__(self, file: str, located: Located) -> None:
        self.file = file
        self.located = located
        self.problems: list[tuple[int, int, str]] = []

    def add(
        self, path: Path, message: str, *, at_key: bool = False, mark: Mark | None = None
    ) -> None:
        where = mark or (self.located.key_mark(path) if at_key else self.located.mark(path))
        line, col = (where.line, where.column) if where else (1, 1)
        self.problems.append(
            (line, col, f"{self.file}:{line}:{col}: {format_path(path)}: {message}")
        )

    def messages(self) -> list[str]:
        seen: set[str] = set()
        out = []
        for _, _, msg in sorted(self.problems, key=lambda p: (p[0], p[1])):
            if msg not in seen:
                seen.add(msg)
                out.append(msg)
        return out

    def raise_if_any(self) -> None:
        """Raise ``PlanError`` with every problem, in position order, if there are any."""
        if self.problems:
            raise PlanError(self.messages())


def validate_text(schema: Mapping[str, Any], text: str, *, file: str) -> dict[str, Any]:
    """Validate YAML ``text`` against ``schema`` (a mapping schema, such as the plan's
    ``builtin`` block for ``--model-config``); every problem is a ``PlanError`` line
    with ``file:line:column``. Returns the mapping."""
    located = read_yaml(text, file=file)
    if not isinstance(located.data, dict):
        raise PlanError(
            [f"{file}:1:1: (top level): expected a mapping, found {show(located.data)}"]
        )
    import jsonschema

    report = Report(file, located)
    for err in jsonschema.Draft202012Validator(dict(schema)).iter_errors(located.data):
        add_schema_error(report, err)
    report.raise_if_any()
    return located.data


# --------------------------------------------------------------------------- schema errors


def _ref_name(ref: str) -> str:
    """``#/$defs/dummy_run_step`` -> ``dummy_run``: a reference to one kind of item."""
    return ref.rsplit("/", 1)[-1].removesuffix("_step")


def expected_of(schema: Mapping[str, Any]) -> str:
    """A short English rendering of what a (sub)schema accepts."""
    if "$ref" in schema:
        return "a step"
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(str(v) for v in schema["enum"])
    if "oneOf" in schema:
        return " or ".join(expected_of(s) for s in schema["oneOf"])
    kind = schema.get("type")
    if kind == "object" and "required" in schema and len(schema.get("properties", {})) == 1:
        key = schema["required"][0]
        return f"{{{key}: [first, last]}}"
    word = _TYPE_WORDS.get(str(kind), str(kind))
    if kind in ("integer", "number") and "minimum" in schema and "maximum" in schema:
        word += f" from {schema['minimum']} to {schema['maximum']}"
    elif kind in ("integer", "number") and "minimum" in schema:
        word += f" >= {schema['minimum']}"
    return word


def _choose_branch(branches: list[Any], inst: Any) -> int | None:
    """The alternative of a ``oneOf`` the value means: the kind a ``kind`` key names,
    the expansion its only key names, or the one of its type."""
    for i, branch in enumerate(branches):
        if "$ref" in branch:
            if isinstance(inst, dict) and inst.get("kind") == _ref_name(branch["$ref"]):
                return i
            continue
        if branch.get("type") == "object" and isinstance(inst, dict):
            req = branch.get("required", [])
            if req and req[0] in inst:
                return i
            if not req and len(branches) > 1:
                return i
        if branch.get("type") == "array" and isinstance(inst, list):
            return i
        if branch.get("type") == "string" and isinstance(inst, str):
            return i
        if branch.get("type") == "integer" and isinstance(inst, int) and not isinstance(inst, bool):
            return i
        if (
            branch.get("type") == "number"
            and isinstance(inst, (int, float))
            and not isinstance(inst, bool)
        ):
            return i
    return None


def _add_unchosen(report: Report, path: Path, schema: Mapping[str, Any], inst: Any) -> None:
    """No alternative fits: for kinds of item (``$ref`` branches) say which kinds exist."""
    branches = schema.get("oneOf", [])
    refs = [b["$ref"] for b in branches if "$ref" in b]
    if refs and len(refs) == len(branches):
        kinds = [_ref_name(r) for r in refs]
        listed = ", ".join(kinds)
        if isinstance(inst, dict) and "kind" in inst:
            report.add(
                (*path, "kind"),
                f"unknown step kind {show(inst['kind'])}; expected one of {listed}{did_you_mean(str(inst['kind']), kinds)}",
            )
        elif isinstance(inst, dict):
            report.add(path, f"missing required key 'kind'; expected one of {listed}")
        else:
            report.add(path, f"expected a step mapping, found {show(inst)}")
        return
    report.add(path, f"expected {expected_of(schema)}, found {show(inst)}")


def add_schema_error(report: Report, err: ValidationError) -> None:
    """Word one jsonschema error (and, for alternatives, the chosen branch's errors)."""
    path = tuple(err.absolute_path)
    instance: Any = err.instance
    expected_value: Any = err.validator_value
    schema = err.schema if isinstance(err.schema, dict) else {}
    v = err.validator
    if v == "oneOf":
        chosen = _choose_branch(schema.get("oneOf", []), instance)
        if chosen is not None:
            sub = [
                e
                for e in err.context or []
                if e.relative_schema_path and e.relative_schema_path[0] == chosen
            ]
            if sub:
                for e in sub:
                    add_schema_error(report, e)
                return
        _add_unchosen(report, path, schema, instance)
        return
    if v == "additionalProperties":
        props = schema.get("properties", {})
        inst = instance if isinstance(instance, dict) else {}
        for key in inst:
            if key not in props:
                report.add(
                    (*path, key),
                    f"unknown key {key!r}{did_you_mean(key, props)}; expected one of {', '.join(props)}",
                    at_key=True,
                )
        return
    if v == "required":
        missing = [k for k in schema.get("required", []) if k not in (instance or {})]
        for key in missing:
            report.add(path, f"missing required key {key!r}")
        return
    if v == "type":
        expected = [expected_value] if isinstance(expected_value, str) else expected_value
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in expected)
        report.add(path, f"expected {words}, found {show(instance)}")
        return
    if v == "enum":
        options = [str(o) for o in expected_value]
        hint = did_you_mean(str(instance), options) if isinstance(instance, str) else ""
        report.add(path, f"expected one of {', '.join(options)}, found {show(instance)}{hint}")
        return
    if v == "const":
        report.add(path, f"expected {expected_value!r}, found {show(instance)}")
        return
    if v in ("minimum", "exclusiveMinimum", "maximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<="}[str(v)]
        word = "an integer" if schema.get("type") == "integer" else "a number"
        report.add(path, f"expected {word} {op} {expected_value}, found {show(instance)}")
        return
    if v in ("minItems", "maxItems"):
        n = expected_value
        what = "at least" if v == "minItems" else "at most"
        if schema.get("minItems") == schema.get("maxItems"):
            what = "exactly"
        report.add(path, f"expected {what} {n} item{'s' if n != 1 else ''}, found {len(instance)}")
        return
    if v == "items" and schema.get("items") is False:
        report.add(
            path,
            f"expected exactly {len(schema.get('prefixItems', []))} items, found {len(instance)}",
        )
        return
    if v == "uniqueItems":
        report.add(path, f"expected unique items, found duplicates in {instance!r}")
        return
    if v == "pattern":
        words = PATTERN_WORDS.get(str(expected_value), f"a value matching {expected_value}")
        report.add(path, f"expected {words}, found {show(instance)}")
        return
    if v == "propertyNames":
        report.add(path, f"invalid name {instance!r}")
        return
    if v == "minLength":
        report.add(path, "expected a non-empty string, found ''")
        return
    report.add(path, f"{err.message}")
