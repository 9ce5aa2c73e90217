"""Load a plan: YAML -> schema validation -> frozen, typed records.

Every problem names ``file:line:column``, the path to the field
(``steps[2].tokens[0]``), what was found and what was expected, with a hint where
one helps. All problems of a file are reported at once (``PlanError.problems``).
No torch import on this path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmplan import schema as S
from warmplan.autotune import DEFAULT_TIMEOUT_S
from warmplan.diagnostics import did_you_mean as _suggest
from warmplan.errors import PlanError
from warmplan.fastcheck import compile_schema
from warmplan.steps import STEP_KINDS, STEPS
from warmplan.steps.base import StepFields, StepSpec
from warmplan.steps.common import Gates, build_gates, check_gates
from warmplan.yamlsrc import Located, Mark, YamlError, load_located

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError

MAX_PLAN_BYTES = 4 * 1024 * 1024

Step = StepSpec  # a record of one of the registered kinds (``warmplan.steps.STEPS``)


@dataclass(frozen=True, slots=True, kw_only=True)
class CompileCacheSpec:
    share: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A validated plan. ``source`` is the text it was read from."""

    version: int
    name: str
    description: str = ""
    when: Gates = field(default_factory=Gates)
    builtin: Mapping[str, Any] = field(default_factory=dict)
    compile_cache: CompileCacheSpec = field(default_factory=CompileCacheSpec)
    steps: tuple[Step, ...]
    path: str | None = None
    source: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(f"no step {step_id!r}; steps: {', '.join(s.id for s in self.steps)}")


# --------------------------------------------------------------------------- errors


def format_path(path: Iterable[str | int]) -> str:
    """``("steps", 2, "tokens", 0)`` -> ``steps[2].tokens[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}


def _expected_of(schema: Mapping[str, Any]) -> str:
    """A short English rendering of what a (sub)schema accepts."""
    if "$ref" in schema:
        return "a step"
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(str(v) for v in schema["enum"])
    if "oneOf" in schema:
        return " or ".join(_expected_of(s) for s in schema["oneOf"])
    kind = schema.get("type")
    if kind == "object" and "required" in schema and len(schema.get("properties", {})) == 1:
        key = schema["required"][0]
        return f"{{{key}: [first, last]}}"
    word = _TYPE_WORDS.get(str(kind), str(kind))
    if kind in ("integer", "number") and "minimum" in schema:
        word += f" >= {schema['minimum']}"
    return word


class _Reporter:
    def __init__(self, file: str, located: Located) -> None:
        self.file = file
        self.located = located
        self.problems: list[tuple[int, int, str]] = []

    def add(self, path: tuple[str | int, ...], message: str, *, at_key: bool = False, mark: Mark | None = None) -> None:
        where = mark or (self.located.key_mark(path) if at_key else self.located.mark(path))
        line, col = (where.line, where.column) if where else (1, 1)
        self.problems.append((line, col, f"{self.file}:{line}:{col}: {format_path(path)}: {message}"))

    def messages(self) -> list[str]:
        seen: set[str] = set()
        out = []
        for _, _, msg in sorted(self.problems, key=lambda p: (p[0], p[1])):
            if msg not in seen:
                seen.add(msg)
                out.append(msg)
        return out


def _report_schema_error(rep: _Reporter, err: ValidationError) -> None:
    path = tuple(err.absolute_path)
    instance: Any = err.instance
    expected_value: Any = err.validator_value
    schema = err.schema if isinstance(err.schema, dict) else {}
    v = err.validator
    if v == "oneOf":
        # Pick the branch meant by the value (a step's kind, an expansion's key) and
        # report its own errors; otherwise say what the alternatives were.
        branches = schema.get("oneOf", [])
        inst = instance
        chosen = _choose_branch(branches, inst)
        if chosen is not None:
            sub = [e for e in err.context or [] if e.relative_schema_path and e.relative_schema_path[0] == chosen]
            if sub:
                for e in sub:
                    _report_schema_error(rep, e)
                return
        if _is_step_list_item(path):
            kinds = ", ".join(STEP_KINDS)
            if isinstance(inst, dict) and "kind" in inst:
                rep.add((*path, "kind"), f"unknown step kind {_show(inst['kind'])}; expected one of {kinds}{_suggest(str(inst['kind']), STEP_KINDS)}")
            elif isinstance(inst, dict):
                rep.add(path, f"missing required key 'kind'; expected one of {kinds}")
            else:
                rep.add(path, f"expected a step mapping, found {_show(inst)}")
            return
        rep.add(path, f"expected {_expected_of(schema)}, found {_show(inst)}")
        return
    if v == "additionalProperties":
        props = schema.get("properties", {})
        inst = instance if isinstance(instance, dict) else {}
        for key in inst:
            if key not in props:
                rep.add((*path, key), f"unknown key {key!r}{_suggest(key, props)}; expected one of {', '.join(props)}", at_key=True)
        return
    if v == "required":
        missing = [k for k in schema.get("required", []) if k not in (instance or {})]
        for key in missing:
            rep.add(path, f"missing required key {key!r}")
        return
    if v == "type":
        expected = expected_value
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in ([expected] if isinstance(expected, str) else expected))
        rep.add(path, f"expected {words}, found {_show(instance)}")
        return
    if v == "enum":
        options = [str(o) for o in expected_value]
        hint = _suggest(str(instance), options) if isinstance(instance, str) else ""
        rep.add(path, f"expected one of {', '.join(options)}, found {_show(instance)}{hint}")
        return
    if v == "const":
        rep.add(path, f"expected {expected_value!r}, found {_show(instance)}")
        return
    if v in ("minimum", "exclusiveMinimum", "maximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<="}[str(v)]
        word = "an integer" if schema.get("type") == "integer" else "a number"
        rep.add(path, f"expected {word} {op} {expected_value}, found {_show(instance)}")
        return
    if v in ("minItems", "maxItems"):
        n = expected_value
        what = "at least" if v == "minItems" else "at most"
        if schema.get("minItems") == schema.get("maxItems"):
            what = "exactly"
        rep.add(path, f"expected {what} {n} item{'s' if n != 1 else ''}, found {len(instance)}")
        return
    if v == "items" and schema.get("items") is False:
        rep.add(path, f"expected exactly {len(schema.get('prefixItems', []))} items, found {len(instance)}")
        return
    if v == "uniqueItems":
        rep.add(path, f"expected unique items, found duplicates in {instance!r}")
        return
    if v == "pattern":
        if path and path[-1] == "device_capability":
            rep.add(path, f"expected major.minor such as '9.0', found {_show(instance)}")
        elif (path and path[-1] == "id") or path == ("name",):
            rep.add(path, f"expected an id of lower-case letters, digits, '-', '_' or '.', found {_show(instance)}")
        else:
            rep.add(path, f"expected a value matching {expected_value}, found {_show(instance)}")
        return
    if v == "propertyNames":
        rep.add(path, f"invalid name {instance!r}")
        return
    if v == "minLength":
        rep.add(path, "expected a non-empty string, found ''")
        return
    rep.add(path, f"{err.message}")


def _is_step_list_item(path: tuple[str | int, ...]) -> bool:
    return len(path) == 2 and path[0] == "steps" and isinstance(path[1], int)


def _choose_branch(branches: list[Any], inst: Any) -> int | None:
    for i, branch in enumerate(branches):
        if "$ref" in branch:
            kind = branch["$ref"].rsplit("/", 1)[-1].removesuffix("_step")
            if isinstance(inst, dict) and inst.get("kind") == kind:
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
        if branch.get("type") == "number" and isinstance(inst, (int, float)) and not isinstance(inst, bool):
            return i
    return None


# --------------------------------------------------------------------------- loading

_FAST = compile_schema(S.SCHEMA)
_VALIDATOR: Any = None


def _validator() -> Any:
    """jsonschema's validator, made on first use: importing jsonschema costs ~0.2 s,
    and valid plans never need it."""
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema

        _VALIDATOR = jsonschema.Draft202012Validator(S.SCHEMA)
    return _VALIDATOR


def read_source(path: str | os.PathLike[str]) -> str:
    """Read a plan file as UTF-8; every failure is a one-line ``PlanError``."""
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise PlanError([f"{name}: no such file"])
    if p.is_dir():
        raise PlanError([f"{name}: is a directory, expected a plan file (.yaml)"])
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise PlanError([f"{name}: cannot read: {exc.strerror}"]) from None
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError([f"{name}: {len(raw)} bytes; plans are limited to {MAX_PLAN_BYTES} bytes"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PlanError([f"{name}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); plans are UTF-8 text"]) from None


def load_plan(source: str | os.PathLike[str], *, name: str | None = None) -> Plan:
    """Load and validate a plan from a path, or from YAML text (``name`` labels it).

    A string that contains a newline, or does not name an existing file, is taken
    as YAML text. Raises ``PlanError`` listing every problem.
    """
    if isinstance(source, os.PathLike) or ("\n" not in source and (Path(source).exists() or source.endswith((".yaml", ".yml")))):
        label = str(source)
        return parse_plan(read_source(source), file=label, path=label)
    return parse_plan(source, file=name or "<plan>", path=None)


def parse_plan(text: str, *, file: str = "<plan>", path: str | None = None) -> Plan:
    """Validate YAML ``text`` and build the ``Plan``; ``file`` labels messages."""
    try:
        located = load_located(text)
    except YamlError as exc:
        where = f"{exc.mark.line}:{exc.mark.column}:" if exc.mark else ""
        raise PlanError([f"{file}:{where} {exc.message}"]) from None
    data = located.data
    if not isinstance(data, dict):
        raise PlanError([f"{file}:1:1: (top level): expected a mapping with version, name and steps, found {_show(data)}"])
    rep = _Reporter(file, located)
    if not _FAST(data):
        # The slow, exact validator decides and explains.
        for err in _validator().iter_errors(data):
            _report_schema_error(rep, err)
    kinds = {s.get("id"): s.get("kind") for s in data.get("steps", []) if isinstance(s, dict)} if isinstance(data.get("steps"), list) else {}
    _check_semantics(rep, data, kinds)
    if rep.problems:
        raise PlanError(rep.messages())
    return _build(data, located, text, path)


def check_mapping(schema: Mapping[str, Any], text: str, *, file: str) -> dict[str, Any]:
    """Validate YAML ``text`` against ``schema`` (a sub-schema of the plan's, such as
    the ``builtin`` block for ``--model-config``); problems are a ``PlanError`` with
    ``file:line:column`` like a plan's. Returns the mapping."""
    try:
        located = load_located(text)
    except YamlError as exc:
        where = f"{exc.mark.line}:{exc.mark.column}:" if exc.mark else ""
        raise PlanError([f"{file}:{where} {exc.message}"]) from None
    if not isinstance(located.data, dict):
        raise PlanError([f"{file}:1:1: (top level): expected a mapping, found {_show(located.data)}"])
    import jsonschema

    rep = _Reporter(file, located)
    for err in jsonschema.Draft202012Validator(dict(schema)).iter_errors(located.data):
        _report_schema_error(rep, err)
    if rep.problems:
        raise PlanError(rep.messages())
    return located.data


def _check_semantics(rep: _Reporter, data: dict[str, Any], kinds: Mapping[Any, Any]) -> None:
    """What the schema cannot say: unique ids, references, and each kind's own checks."""
    # Runs even when the schema found problems, so every problem is reported at once:
    # each check looks only at values of the right shape.
    raw_steps = data.get("steps")
    steps = raw_steps if isinstance(raw_steps, list) else []
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        sid = step.get("id") if isinstance(step, dict) else None
        if not isinstance(sid, str):
            continue
        if sid in index:
            rep.add(("steps", i, "id"), f"duplicate step id {sid!r} (first used by steps[{index[sid]}])")
        else:
            index[sid] = i
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            continue
        if isinstance(step.get("when"), dict):
            check_gates(step["when"], ("steps", i, "when"), rep)
        _check_replaces(rep, step, i, index, kinds)
        name = step.get("kind")
        kind = STEPS.get(name) if isinstance(name, str) else None
        if kind is not None:
            kind.check(step, ("steps", i), rep)
    if isinstance(data.get("when"), dict):
        check_gates(data["when"], ("when",), rep)


def _check_replaces(rep: _Reporter, step: dict[str, Any], i: int, index: Mapping[str, int], kinds: Mapping[Any, Any]) -> None:
    target = step.get("replaces")
    if not isinstance(target, str):
        return
    j = index.get(target)
    if j is None:
        rep.add(("steps", i, "replaces"), f"no step with id {target!r}{_suggest(target, index)}")
    elif j <= i:
        rep.add(("steps", i, "replaces"), f"expected a later step, found {target!r} (steps[{j}]), which runs before this one")
    elif kinds.get(target) != "dummy_run":
        rep.add(("steps", i, "replaces"), f"expected the id of a dummy_run step, found {target!r}, a {kinds.get(target)} step")


def _build(data: dict[str, Any], located: Located, text: str, path: str | None) -> Plan:
    steps: list[Step] = []
    for i, raw in enumerate(data["steps"]):
        mark = located.mark(("steps", i))
        common = StepFields(
            id=raw["id"],
            kind=raw["kind"],
            description=raw.get("description", ""),
            enabled=raw.get("enabled", True),
            when=build_gates(raw.get("when", {})),
            replaces=raw.get("replaces"),
            line=mark.line if mark else 0,
        )
        steps.append(STEPS[raw["kind"]].build(raw, common))
    cc = data.get("compile_cache", {})
    return Plan(
        version=data["version"],
        name=data["name"],
        description=data.get("description", ""),
        when=build_gates(data.get("when", {})),
        builtin=dict(data.get("builtin", {})),
        compile_cache=CompileCacheSpec(share=cc.get("share", False), timeout_s=float(cc.get("timeout_s", DEFAULT_TIMEOUT_S))),
        steps=tuple(steps),
        path=path,
        source=text,
    )


def load_plans(paths: Iterable[str]) -> Iterator[tuple[str, Plan | PlanError]]:
    """Load each path, yielding the plan or its ``PlanError``."""
    for p in paths:
        try:
            yield p, load_plan(Path(p))
        except PlanError as exc:
            yield p, exc


@dataclass(frozen=True, slots=True)
class Checked:
    """What ``validate`` needs of one file: its name and step count, or its problems."""

    path: str
    name: str | None
    steps: int
    problems: tuple[str, ...]


def _check_one(path: str) -> Checked:
    try:
        plan = load_plan(Path(path))
    except PlanError as exc:
        return Checked(path, None, 0, tuple(exc.problems))
    return Checked(path, plan.name, len(plan.steps), ())


def check_files(paths: list[str], *, jobs: int | None = None) -> list[Checked]:
    """Validate many files, in order; on several cores, in forked worker processes."""
    jobs = jobs if jobs is not None else min(os.cpu_count() or 1, 8)
    if jobs <= 1 or len(paths) < 16 or "fork" not in __import__("multiprocessing").get_all_start_methods():
        return [_check_one(p) for p in paths]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_check_one, paths, chunksize=max(1, len(paths) // (jobs * 4))))
