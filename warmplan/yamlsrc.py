"""Read YAML safely into plain Python data, keeping where every value came from.

Only the standard YAML tags are accepted (``!!python/...`` and every other tag is
an error: a plan can never name code to import); alias expansion is bounded (a
billion-laughs file fails fast); duplicate keys are errors. Each value's position
is kept by its path (``("steps", 2, "tokens", 0)``) so that errors can name
``file:line:column``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import yaml

Path = tuple[str | int, ...]

# A plan of a few hundred steps has a few thousand nodes; anything near this limit is
# an alias bomb, not a plan.
MAX_NODES = 200_000
MAX_DEPTH = 64
# Python refuses to turn more than 4300 digits into an int (CVE-2020-10735); no count
# in a plan needs more than a few, so anything longer is an error with its position.
MAX_INT_CHARS = 64

_STANDARD_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}


@dataclass(frozen=True, slots=True)
class Mark:
    """A 1-based line and column in a source file."""

    line: int
    column: int


class YamlError(Exception):
    """A problem found while reading YAML, with its position."""

    def __init__(self, message: str, mark: Mark | None) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


@dataclass(slots=True)
class Located:
    """Plain data plus the YAML node tree it was built from, for positions.

    Positions are looked up only when a problem is reported, by walking the node
    tree along the path, so that loading a valid plan records nothing extra.
    """

    data: Any
    root: yaml.Node

    def _walk(self, path: Path) -> tuple[yaml.Node, yaml.Node | None]:
        """The deepest node along ``path`` and, if it is a mapping value, its key node."""
        node, key_node = self.root, None
        for part in path:
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == part:
                        node, key_node = v, k
                        break
                else:
                    return node, None
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(part, int)
                and 0 <= part < len(node.value)
            ):
                node, key_node = node.value[part], None
            else:
                return node, None
        return node, key_node

    def mark(self, path: Path) -> Mark | None:
        """The position of the value at ``path``, or of its nearest ancestor."""
        return _mark(self._walk(path)[0])

    def key_mark(self, path: Path) -> Mark | None:
        """The position of the key that holds ``path`` (falls back to the value)."""
        node, key = self._walk(path)
        return _mark(key if key is not None else node)


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc]
    """libyaml's safe loader where PyYAML has it (composition in C is ~10x faster),
    with implicit-tag resolution memoised: a plan repeats the same keys and values
    hundreds of times, and the resolver's regular expressions run in Python."""

    _resolved: ClassVar[dict[tuple[Any, Any, Any], str]] = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is not yaml.ScalarNode:
            return str(super().resolve(kind, value, implicit))
        key = (value, implicit[0] if implicit else None, implicit[1] if implicit else None)
        tag = self._resolved.get(key)
        if tag is None:
            tag = str(super().resolve(kind, value, implicit))
            if len(self._resolved) < 65536:
                self._resolved[key] = tag
        return tag


_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)")


class _Builder:
    def __init__(self) -> None:
        self.nodes = 0
        self.aliased = False
        self.collections: set[int] = set()
        c = yaml.constructor.SafeConstructor()
        # Direct scalar constructors by resolved tag: the same rules as safe_load, without
        # its per-node bookkeeping.
        self.scalar = {
            "tag:yaml.org,2002:str": c.construct_yaml_str,
            "tag:yaml.org,2002:int": c.construct_yaml_int,
            "tag:yaml.org,2002:float": c.construct_yaml_float,
            "tag:yaml.org,2002:bool": c.construct_yaml_bool,
            "tag:yaml.org,2002:null": c.construct_yaml_null,
        }

    def _seen(self, node: yaml.Node) -> None:
        # An alias is the same node object built again: only then can a small file
        # expand to many values.
        if id(node) in self.collections:
            self.aliased = True
        self.collections.add(id(node))

    def build(self, node: yaml.Node, depth: int) -> Any:
        self.nodes += 1
        tag = node.tag
        if isinstance(node, yaml.ScalarNode) and self.nodes <= MAX_NODES:
            # The common cases first, without the constructor's bookkeeping.
            if tag == _STR:
                return node.value
            if tag == _INT and len(node.value) > MAX_INT_CHARS:
                raise YamlError(
                    f"an integer of {len(node.value)} characters; "
                    f"plans hold integers of at most {MAX_INT_CHARS}",
                    _mark(node),
                )
            if tag == _INT and _DECIMAL.fullmatch(node.value):
                return int(node.value)
        if self.nodes > MAX_NODES:
            why = " (aliases referring to aliases?)" if self.aliased else ""
            raise YamlError(
                f"the document expands to more than {MAX_NODES} values{why}; "
                "plans must be small and explicit",
                _mark(node),
            )
        if depth > MAX_DEPTH:
            raise YamlError(f"nesting deeper than {MAX_DEPTH} levels", _mark(node))
        if node.tag not in _STANDARD_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise YamlError(
                f"tag {tag!r} is not allowed: plans hold plain data only "
                "(strings, numbers, booleans, null, lists, mappings)",
                _mark(node),
            )
        if isinstance(node, yaml.MappingNode):
            self._seen(node)
            out: dict[str, Any] = {}
            first: dict[str, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise YamlError("merge keys ('<<') are not supported in plans", _mark(key_node))
                key = self.build(key_node, depth + 1)
                if not isinstance(key, str):
                    raise YamlError(f"mapping keys must be strings, found {key!r}", _mark(key_node))
                if key in first:
                    raise YamlError(
                        f"duplicate key {key!r} (first at line {_mark(first[key]).line})",
                        _mark(key_node),
                    )
                first[key] = key_node
                out[key] = self.build(value_node, depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            self._seen(node)
            return [self.build(item, depth + 1) for item in node.value]
        if isinstance(node, yaml.ScalarNode):
            return self.scalar[node.tag](node)
        raise YamlError(f"unexpected YAML node {type(node).__name__}", _mark(node))


def _documents(loader: Any) -> Iterator[yaml.Node]:
    while loader.check_node():
        node = loader.get_node()
        if node is not None:
            yield node


def load_located(text: str) -> Located:
    """Parse one YAML document; raise ``YamlError`` with a position on any problem."""
    try:
        loader = _Loader(text)
    except UnicodeEncodeError as exc:  # libyaml takes UTF-8: a lone surrogate cannot be
        before = text[: exc.start]
        at = Mark(before.count("\n") + 1, exc.start - (before.rfind("\n") + 1) + 1)
        raise YamlError(f"invalid YAML: not Unicode text ({exc.reason})", at) from None
    try:
        docs = list(_documents(loader))
    except yaml.reader.ReaderError as exc:
        # A character YAML refuses (a control character, say): no mark, a position.
        before = text[: exc.position]
        at = Mark(before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1)
        raise YamlError(
            f"invalid YAML: unacceptable character #x{exc.character:04x}: {exc.reason}"
            if isinstance(exc.character, int)
            else f"invalid YAML: {exc.reason}",
            at,
        ) from None
    except UnicodeEncodeError as exc:  # a lone surrogate in text handed to parse_plan
        before = text[: exc.start]
        at = Mark(before.count("\n") + 1, exc.start - (before.rfind("\n") + 1) + 1)
        raise YamlError(f"invalid YAML: not Unicode text ({exc.reason})", at) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Mark(mark.line + 1, mark.column + 1) if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlError(f"invalid YAML: {problem}", where) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"invalid YAML: {exc}", None) from None
    finally:
        loader.dispose()
    if not docs:
        raise YamlError("the file is empty; expected a plan mapping", Mark(1, 1))
    if len(docs) > 1:
        raise YamlError("expected one YAML document, found several ('---')", _mark(docs[1]))
    data = _Builder().build(docs[0], 0)
    return Located(data=data, root=docs[0])
