"""Read plan YAML into plain data plus a map from every key and value to its line:column.

PyYAML's ``safe_load`` drops positions and silently keeps the last of duplicate keys, so we compose the node
graph ourselves and build the data from it: duplicate keys, non-scalar keys and foreign tags become
diagnostics, and ``SourceMap`` remembers where each data path (``("helper", "aux_vcpus")``) starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.error import Mark, MarkedYAMLError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from confplan.plan.diagnostics import Diagnostic

DataPath = tuple[str | int, ...]
Position = tuple[int, int]  # 1-based line, column

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAX_DEPTH = 64  # plans are shallow; deeper means a recursive alias or a hostile file
_MAX_NODES = 100_000  # aliases can multiply nodes ("billion laughs"); a real plan has a few hundred


class _PlanLoader(yaml.SafeLoader):
    """SafeLoader: only plain YAML types are ever constructed (no Python objects)."""


@dataclass
class SourceMap:
    """Start positions of values and of their keys, by data path."""

    values: dict[DataPath, Position] = field(default_factory=dict)
    keys: dict[DataPath, Position] = field(default_factory=dict)

    def locate(self, path: DataPath, *, key: bool = False) -> Position:
        """Where ``path`` starts (its key when ``key``), else where its nearest written ancestor starts."""
        if key and path in self.keys:
            return self.keys[path]
        for end in range(len(path), -1, -1):
            prefix = path[:end]
            if prefix in self.values:
                return self.values[prefix]
        return (1, 1)


@dataclass
class YamlDocument:
    """The plan's data (None when it could not be read) with its source map and any problems found."""

    data: Any
    source: SourceMap
    problems: list[Diagnostic]
    refused: set[DataPath] = field(default_factory=set)  # values read as null because YAML refused them


def _pos(mark: Mark | None) -> Position:
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


def _offset_pos(text: str, offset: int) -> Position:
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


class _Builder:
    """Turns composed nodes into dicts, lists and scalars, recording positions and problems."""

    def __init__(self, loader: _PlanLoader, file: str) -> None:
        self.loader = loader
        self.file = file
        self.source = SourceMap()
        self.problems: list[Diagnostic] = []
        self.nodes = 0
        self.active: set[int] = set()  # collections being built: meeting one again means a recursive alias
        self.built: dict[int, Any] = {}
        self.refused: set[DataPath] = set()

    def problem(self, position: Position, path: DataPath, message: str) -> None:
        self.problems.append(Diagnostic(self.file, position[0], position[1], render_path(path), message))

    def build(self, node: Node, path: DataPath) -> Any:
        self.source.values.setdefault(path, _pos(node.start_mark))
        self.nodes += 1
        if len(path) > _MAX_DEPTH or self.nodes > _MAX_NODES or id(node) in self.active:
            raise _TooBig(node)
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.problem(_pos(node.start_mark), path, f"unsupported YAML tag {tag}; remove the tag")
            self.refused.add(path)
            return None
        # A node reached again through an alias is built once: its problems are reported once too.
        if id(node) not in self.built:
            self.active.add(id(node))
            self.built[id(node)] = self.collection(node, path)
            self.active.discard(id(node))
        return self.built[id(node)]

    def collection(self, node: Node, path: DataPath) -> Any:
        if isinstance(node, SequenceNode):
            return [self.build(child, (*path, index)) for index, child in enumerate(node.value)]
        assert isinstance(node, MappingNode)
        return self.mapping(node, path)

    def scalar(self, node: ScalarNode, path: DataPath) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except MarkedYAMLError as err:  # e.g. an unknown !tag or a malformed !!int
            self.problem(
                _pos(err.problem_mark or node.start_mark), path, f"invalid YAML value: {err.problem}"
            )
        except ValueError as err:  # e.g. an integer with more digits than Python converts
            self.problem(_pos(node.start_mark), path, f"invalid YAML value: {err}")
        except Exception:  # PyYAML's scalar constructors fail in many ways on odd tagged values ("!!bool ")
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.problem(_pos(node.start_mark), path, f"invalid YAML value {node.value!r} for tag {tag}")
        self.refused.add(path)
        return None

    def mapping(self, node: MappingNode, path: DataPath) -> dict[str, Any]:
        self.check_duplicates(node, path)
        self.loader.flatten_mapping(node)  # resolves "<<: *anchor" merge keys; own keys come last and win
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.problem(
                    _pos(key_node.start_mark), path, "a key must be a plain name, not a list or mapping"
                )
                continue
            child = (*path, key_node.value)
            self.source.keys[child] = _pos(key_node.start_mark)
            self.source.values[child] = _pos(value_node.start_mark)
            result[key_node.value] = self.build(value_node, child)
        return result

    def check_duplicates(self, node: MappingNode, path: DataPath) -> None:
        seen: dict[str, Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            first = seen.setdefault(key_node.value, key_node.start_mark)
            if first is not key_node.start_mark:
                line, column = _pos(first)
                self.problem(
                    _pos(key_node.start_mark),
                    (*path, key_node.value),
                    f"duplicate key {key_node.value!r} (first at line {line}, column {column}); keep one",
                )


class _TooBig(Exception):
    def __init__(self, node: Node) -> None:
        self.node = node


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_<][A-Za-z0-9_<>-]*$")


def render_path(path: DataPath) -> str:
    """("stages", 2, "precopy") -> "stages[2].precopy"; an odd key is quoted: guest['a b']."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


def read_yaml(text: str, file: str) -> YamlDocument:
    """Parse ``text``; syntax errors, an empty file or a non-mapping root give ``data=None``."""
    source = SourceMap()
    try:
        loader = _PlanLoader(text)
    except yaml.reader.ReaderError as err:  # a control character or bad encoding, found before parsing
        line, column = _offset_pos(text, err.position)
        return YamlDocument(None, source, [Diagnostic(file, line, column, "", f"invalid YAML: {err.reason}")])
    try:
        return _read(loader, text, file)
    finally:
        loader.dispose()


def _read(loader: _PlanLoader, text: str, file: str) -> YamlDocument:
    builder = _Builder(loader, file)
    try:
        root = loader.get_single_node()
        data = builder.build(root, ()) if root is not None else None
    except MarkedYAMLError as err:
        line, column = _pos(err.problem_mark or err.context_mark)
        return YamlDocument(None, builder.source, [Diagnostic(file, line, column, "", _syntax_message(err))])
    except yaml.reader.ReaderError as err:
        line, column = _offset_pos(text, err.position)
        return YamlDocument(
            None, builder.source, [Diagnostic(file, line, column, "", f"invalid YAML: {err.reason}")]
        )
    except (_TooBig, RecursionError):
        message = "the document is nested too deeply or expands too far (a recursive or repeated YAML alias?)"
        return YamlDocument(None, builder.source, [Diagnostic(file, 1, 1, "", message)])
    if data is None:
        message = "the plan is empty; it needs at least 'guest: {memory: 256MiB}'"
        return YamlDocument(None, builder.source, [*builder.problems, Diagnostic(file, 1, 1, "", message)])
    if not isinstance(data, dict):
        line, column = _pos(root.start_mark if root is not None else None)
        message = f"the plan must be a mapping of sections (apiVersion, guest, ...), not {describe(data)}"
        return YamlDocument(
            None, builder.source, [*builder.problems, Diagnostic(file, line, column, "", message)]
        )
    return YamlDocument(data, builder.source, builder.problems, builder.refused)


def _syntax_message(err: MarkedYAMLError) -> str:
    message = f"invalid YAML: {err.problem or err.context}"
    if err.context and err.problem and err.context_mark is not None:
        message += (
            f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
        )
    return message


def describe(value: Any) -> str:
    """A YAML value as a message shows it: 'abc', 12, true, null, a list, a mapping."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, int) and value.bit_length() > 128:
        return "a huge integer"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"
