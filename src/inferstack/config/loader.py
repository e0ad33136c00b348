"""Load `inferstack.yaml` with line marks so every validation error names file:line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from inferstack.config.schema import InferstackConfig


class ConfigError(Exception):
    """A config file problem; ``str()`` is a list of ``file:line: message`` lines."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _MarkedDict(dict):
    """A mapping that remembers the line of each key (1-based)."""

    lines: dict[Any, int]
    line: int


class _MarkedList(list):
    lines: list[int]
    line: int


class _MarkedLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> _MarkedDict:  # type: ignore[override]
        out = _MarkedDict()
        out.lines = {}
        out.line = node.start_mark.line + 1
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be scalars", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
            out[key] = self.construct_object(value_node, deep=True)
            out.lines[key] = value_node.start_mark.line + 1
        return out

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> _MarkedList:  # type: ignore[override]
        out = _MarkedList(self.construct_object(child, deep=True) for child in node.value)
        out.lines = [child.start_mark.line + 1 for child in node.value]
        out.line = node.start_mark.line + 1
        return out


_MarkedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _MarkedLoader.construct_mapping)
_MarkedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _MarkedLoader.construct_sequence)


def _line_of(data: Any, loc: Sequence[int | str]) -> int:
    """Deepest known line on the path ``loc`` through the loaded document."""
    line = getattr(data, "line", 1)
    node = data
    for part in loc:
        if isinstance(node, _MarkedDict) and part in node:
            line = node.lines.get(part, line)
            node = node[part]
        elif isinstance(node, _MarkedList) and isinstance(part, int) and 0 <= part < len(node):
            line = node.lines[part]
            node = node[part]
        else:
            break
    return line


@contextlib.contextmanager
def _yaml_errors(source: str) -> Iterator[None]:
    try:
        yield
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{source}:{line}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}:1: invalid YAML: {exc}"]) from None


def load_marked_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML whose mappings/lists remember their lines (see `line_of`); bad YAML → ConfigError."""
    with _yaml_errors(source):
        return yaml.load(text, Loader=_MarkedLoader)


def load_marked_yaml_all(text: str, source: str = "<string>") -> list[Any]:
    """Every document of a multi-document YAML stream (`---`), lines counted from the stream's start."""
    with _yaml_errors(source):
        return list(yaml.load_all(text, Loader=_MarkedLoader))


def line_of(data: Any, loc: Sequence[int | str]) -> int:
    """The line of the value at path ``loc`` in a document from `load_marked_yaml` (deepest known)."""
    return _line_of(data, loc)


def parse_config(text: str, source: str = "<string>") -> InferstackConfig:
    data = load_marked_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}:1: the top level must be a mapping (sections such as `pools:`)"])
    try:
        config = InferstackConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            where = ".".join(str(p) for p in loc) or "(top level)"
            problems.append(f"{source}:{_line_of(data, loc)}: {where}: {err['msg']}")
        raise ConfigError(problems) from None
    cross = config.cross_check()
    if cross:
        raise ConfigError([f"{source}:{_line_of(data, loc)}: {'.'.join(map(str, loc))}: {msg}" for loc, msg in cross])
    return config


def load_config(path: str | Path) -> InferstackConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([f"{p}:0: cannot read config file: {exc.strerror}"]) from None
    return parse_config(text, str(p))
